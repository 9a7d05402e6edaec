"""Optional mask refinement: the fast bilateral solver (Barron & Poole, ECCV 2016), then hole filling.

The protocol of the paper's "+ Bilateral" rows (Table 1; §4.1 "we also follow [11, 12] and
further refine our masks with a bilateral solver [39]"), as TokenCut runs it
(YangtaoWANG95/TokenCut `unsupervised_saliency_detection/get_saliency.py` and `bilateral_solver.py`;
the authors' adambielski/move-seg `bilateral_solver.py` has the same solver settings): σ_spatial
16, σ_luma 16, σ_chroma 8, λ 256; target = mask > 0.5 with confidence 0.999 everywhere; refined =
solver output > 0.5 with holes filled. Unlike TokenCut, all components are kept (MOVE's masks may
hold several objects).

The solver works on a bilateral grid: every pixel falls into one vertex of a 5-D lattice
(x/σs, y/σs, Y/σl, U/σc, V/σc); splatting sums pixel values per vertex, the blur adds the ±1
neighbours along each axis, slicing reads a vertex back at its pixels. The grid is bistochastised
and A·y = λ(Dm − Dn·B·Dn)·y + diag(S·c)·y = S·(c·t) is solved with Jacobi-preconditioned
conjugate gradients (25 iterations, tolerance 1e-5). Matrix-free NumPy; no SciPy needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

_RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],
                        [-0.168736, -0.331264, 0.5],
                        [0.5, -0.418688, -0.081312]])
_YUV_OFFSET = np.array([0.0, 128.0, 128.0])


@dataclass(frozen=True)
class SolverParams:
    sigma_spatial: float = 16.0
    sigma_luma: float = 16.0
    sigma_chroma: float = 8.0
    lam: float = 256.0
    a_diag_min: float = 1e-5
    cg_tol: float = 1e-5
    cg_maxiter: int = 25
    bistochastic_iters: int = 10


class BilateralGrid:
    """Splat / blur / slice on the lattice of one reference image (H, W, 3) uint8 RGB."""

    def __init__(self, reference: np.ndarray, params: SolverParams):
        yuv = reference.astype(np.float64) @ _RGB_TO_YUV.T + _YUV_OFFSET  # (H, W, 3)
        rows, cols = np.mgrid[: reference.shape[0], : reference.shape[1]]
        coords = np.stack([
            cols // params.sigma_spatial, rows // params.sigma_spatial,
            yuv[..., 0] // params.sigma_luma,
            yuv[..., 1] // params.sigma_chroma, yuv[..., 2] // params.sigma_chroma,
        ], axis=-1).reshape(-1, 5).astype(np.int64)  # (P, 5)
        vertices, self.pixel_vertex = np.unique(coords, axis=0, return_inverse=True)
        self.pixel_vertex = self.pixel_vertex.reshape(-1)  # (P,) vertex of every pixel
        self.num_vertices = len(vertices)
        # neighbours by hashing each lattice point to one int64 (coords are small and ≥ -1 + 1)
        base = int(vertices.max()) + 3
        weights = base ** np.arange(5, dtype=np.int64)
        hashes = (vertices + 1) @ weights  # (V,) sorted like `vertices` (lexicographic ≠ hash order)
        order = np.argsort(hashes)
        self.neighbours = []  # per axis and direction: (V,) neighbour vertex index or -1
        for axis in range(5):
            for step in (-1, 1):
                shifted = vertices.copy()
                shifted[:, axis] += step
                wanted = (shifted + 1) @ weights
                pos = np.clip(np.searchsorted(hashes[order], wanted), 0, len(order) - 1)
                found = order[pos]
                self.neighbours.append(np.where(hashes[found] == wanted, found, -1))

    def splat(self, values: np.ndarray) -> np.ndarray:
        """(P,) pixel values → (V,) sums per vertex."""
        return np.bincount(self.pixel_vertex, weights=values, minlength=self.num_vertices)

    def slice(self, vertex_values: np.ndarray) -> np.ndarray:
        return vertex_values[self.pixel_vertex]

    def blur(self, vertex_values: np.ndarray) -> np.ndarray:
        """2·dim·y + Σ neighbours (the [1 2 1] kernel along each of the 5 axes)."""
        out = 2 * 5 * vertex_values
        for neighbour in self.neighbours:
            out = out + np.where(neighbour >= 0, vertex_values[neighbour], 0.0)
        return out


def _bistochastize(grid: BilateralGrid, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Vertex normalisers (n, m) so that the blurred splat–slice is bistochastic."""
    mass = grid.splat(np.ones(len(grid.pixel_vertex)))
    norm = np.ones(grid.num_vertices)
    for _ in range(iters):
        norm = np.sqrt(norm * mass / grid.blur(norm))
    return norm, norm * grid.blur(norm)


def _pcg(apply_a, b: np.ndarray, x0: np.ndarray, inv_diag: np.ndarray, maxiter: int, tol: float) -> np.ndarray:
    """Preconditioned conjugate gradients for a symmetric positive definite operator."""
    x = x0.copy()
    r = b - apply_a(x)
    z = inv_diag * r
    p = z.copy()
    rz = r @ z
    b_norm = np.linalg.norm(b) or 1.0
    for _ in range(maxiter):
        if np.linalg.norm(r) <= tol * b_norm:
            break
        ap = apply_a(p)
        alpha = rz / (p @ ap)
        x += alpha * p
        r -= alpha * ap
        z = inv_diag * r
        rz_next = r @ z
        p = z + (rz_next / rz) * p
        rz = rz_next
    return x


def bilateral_solve(reference: np.ndarray, target: np.ndarray, confidence: np.ndarray,
                    params: SolverParams = SolverParams()) -> np.ndarray:
    """Edge-aware smoothing of `target` (H, W) guided by `reference` (H, W, 3) uint8 → (H, W)."""
    grid = BilateralGrid(reference, params)
    norm, mass = _bistochastize(grid, params.bistochastic_iters)
    conf = confidence.reshape(-1).astype(np.float64)
    conf_splat = grid.splat(conf)

    def apply_a(y: np.ndarray) -> np.ndarray:
        return params.lam * (mass * y - norm * grid.blur(norm * y)) + conf_splat * y

    b = grid.splat(conf * target.reshape(-1))
    a_diag = np.maximum(params.lam * (mass - norm * norm * 2 * 5) + conf_splat, params.a_diag_min)
    y0 = b / np.maximum(conf_splat, 1e-12)
    solved = _pcg(apply_a, b, y0, 1.0 / a_diag, params.cg_maxiter, params.cg_tol)
    return grid.slice(solved).reshape(target.shape)


def fill_holes(binary: np.ndarray) -> np.ndarray:
    """Background regions (4-connected) that do not touch the border become foreground."""
    background = (~binary.astype(bool)).astype(np.uint8)
    _, labels = cv2.connectedComponents(background, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    return ~outside


def refine_mask(image: np.ndarray, mask: np.ndarray, params: SolverParams = SolverParams()) -> np.ndarray:
    """image uint8 (H, W, 3), soft mask (H, W) → refined binary mask as float32 (H, W)."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} and image {image.shape[:2]} differ in size")
    target = (mask > 0.5).astype(np.float64)
    solved = bilateral_solve(image, target, np.full(mask.shape, 0.999), params)
    return fill_holes(solved > 0.5).astype(np.float32)
