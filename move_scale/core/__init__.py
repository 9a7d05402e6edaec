"""What every part of the package may use: the user-error base class and its one-line report
(errors.py), checks of input and output paths with results never lost (paths.py), and the clean
exit of a process in a torch.distributed group (processes.py).

May import: nothing of move_scale outside core/.
"""
