"""Synthetic brain MRI studies with planted findings, built on real anatomy.

The anatomy is the MNI ICBM152 2009 template that ships inside nilearn's wheel (grey matter, white
matter and brain mask probability maps at 2 mm; nothing is downloaded). For each study:

1. findings are drawn and planted in template space as extra tissue channels (a mass with
   vasogenic oedema, an intraparenchymal haemorrhage with a rim of oedema, a territorial infarct)
   or as changes of the tissue maps (cortical thinning for atrophy);
2. a head pose (rotation, translation, head size), a smooth random deformation, and the
   deformations of findings (ventricles widened by atrophy, midline structures pushed aside,
   mass effect) are composed into one mapping from scanner space to template space;
3. each scan (T1, T2, FLAIR, DWI-like) samples the tissue channels through that mapping on its own
   voxel grid (axial slices, its own spacing), mixes them with the contrast's tissue intensities,
   and gets a bias field and noise in scanner units.

Coordinates are RAS millimetres throughout (x to the left-right, y to the front, z up).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

FINDINGS = ("mass", "haemorrhage", "infarct", "atrophy", "midline_shift")

# tissue channels sampled for each scan
CHANNELS = ("gm", "wm", "csf", "mask", "core", "oedema", "blood", "infarct")

# relative signal of each tissue in each contrast (before bias field, noise and scanner scaling)
CONTRASTS = {
    "T1": {"gm": 0.62, "wm": 1.00, "csf": 0.18, "core": 0.28, "oedema": 0.52, "blood": 1.55, "infarct": 0.50},
    "T2": {"gm": 0.62, "wm": 0.42, "csf": 1.30, "core": 1.20, "oedema": 1.10, "blood": 0.12, "infarct": 1.00},
    "FLAIR": {"gm": 0.72, "wm": 0.52, "csf": 0.10, "core": 0.80, "oedema": 1.30, "blood": 1.10, "infarct": 1.15},
    "DWI": {"gm": 0.66, "wm": 0.56, "csf": 0.12, "core": 0.45, "oedema": 0.50, "blood": 0.10, "infarct": 1.70},
}
SERIES_NAMES = {"T1": "t1_se_tra", "T2": "t2_tse_tra", "FLAIR": "t2_flair_tra", "DWI": "ep2d_diff_b1000_tra"}

# field of view of every scan (RAS mm): the template brain with a small margin
FOV = ((-80.0, 80.0), (-114.0, 78.0), (-72.0, 86.0))


@dataclass
class Anatomy:
    """The template: tissue maps [4, Z, Y, X] (gm, wm, csf, mask) on the 2 mm grid, the world
    coordinate of every voxel [3, Z, Y, X], and the voxel-to-world affine (x, y, z order)."""

    maps: torch.Tensor
    coords: torch.Tensor
    affine: np.ndarray
    periphery: torch.Tensor  # [Z, Y, X]: 1 at the brain's surface, 0 deep inside

    @classmethod
    def load(cls) -> "Anatomy":
        from nilearn import datasets
        from scipy.ndimage import gaussian_filter

        gm_img = datasets.load_mni152_gm_template(resolution=2)
        gm = gm_img.get_fdata()
        wm = datasets.load_mni152_wm_template(resolution=2).get_fdata()
        mask = datasets.load_mni152_brain_mask(resolution=2).get_fdata()
        mask = gaussian_filter(mask.astype(np.float64), 0.7)  # soften the binary edge before resampling
        csf = np.clip(mask - gm - wm, 0.0, 1.0)
        stack = np.stack([gm, wm, csf, mask]).astype(np.float32)
        stack = np.ascontiguousarray(np.transpose(stack, (0, 3, 2, 1)))  # (x, y, z) -> (z, y, x)
        affine = np.asarray(gm_img.affine, dtype=np.float64)
        nx, ny, nz = gm.shape
        ii, jj, kk = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
        world = affine[:3, :3] @ np.stack([ii.ravel(), jj.ravel(), kk.ravel()]).astype(np.float64) + affine[:3, 3:4]
        coords = np.transpose(world.reshape(3, nx, ny, nz), (0, 3, 2, 1)).astype(np.float32)
        # distance into the brain, smoothly: where sulci widen when the cortex thins
        periphery = np.clip(1.0 - gaussian_filter(mask, 2.5) * 1.0, 0.0, 1.0) * (mask > 0.2)
        periphery = np.transpose(np.clip(periphery * 3.0, 0.0, 1.0), (2, 1, 0)).astype(np.float32)
        return cls(torch.from_numpy(stack), torch.from_numpy(np.ascontiguousarray(coords)), affine,
                   torch.from_numpy(np.ascontiguousarray(periphery)))


@dataclass
class Lesion:
    """A planted focal finding: where (RAS mm), how large (radius mm), and its descriptive words."""

    kind: str
    center: tuple[float, float, float]
    radius: float
    side: str
    region: str


@dataclass
class StudySpec:
    """Everything random about one study, drawn before any image is made."""

    study_id: str
    labels: dict[str, int]
    contrasts: list[str]
    lesions: list[Lesion] = field(default_factory=list)
    shift_mm: float = 0.0  # midline shift in mm; > 0 towards +x, the patient's right (RAS)
    ventricle_scale: float = 1.0
    cortex_loss: float = 0.0
    pose: dict = field(default_factory=dict)
    seed: int = 0


def side_of(x: float) -> str:
    return "right" if x > 0 else "left"  # RAS: +x is the patient's right


def region_of(center: tuple[float, float, float], deep: bool = False) -> str:
    x, y, z = center
    if deep:
        return "basal ganglia" if y > -20 else "thalamus"
    if y > 5:
        return "frontal lobe"
    if z < 5 and y > -60:
        return "temporal lobe"
    if y < -65:
        return "occipital lobe"
    return "parietal lobe"


def _brain_point(anatomy: Anatomy, rng: np.random.Generator, region: torch.Tensor, min_abs_x: float = 12.0) -> tuple[float, float, float]:
    """A voxel position (RAS mm) drawn uniformly from the voxels where ``region`` [Z, Y, X] bool
    holds, off the midline."""
    candidates = torch.nonzero((region & (anatomy.coords[0].abs() >= min_abs_x)).flatten()).flatten()
    index = int(candidates[int(rng.integers(len(candidates)))])
    return tuple(float(anatomy.coords[c].flatten()[index]) for c in range(3))  # type: ignore[return-value]


def draw_study(anatomy: Anatomy, rng: np.random.Generator, study_id: str, prevalence: float = 0.3) -> StudySpec:
    """The findings, contrasts and pose of one study."""
    labels = {f: int(rng.random() < prevalence) for f in FINDINGS}
    contrasts = ["T1", "T2", "FLAIR", "DWI"]
    if rng.random() < 0.5:
        contrasts.pop(int(rng.integers(len(contrasts))))
    spec = StudySpec(study_id, labels, contrasts, seed=int(rng.integers(2**31)))
    gm, wm = anatomy.maps[0], anatomy.maps[1]
    if labels["mass"]:
        c = _brain_point(anatomy, rng, wm > 0.7)
        spec.lesions.append(Lesion("mass", c, float(rng.uniform(11, 16)), side_of(c[0]), region_of(c)))
    if labels["haemorrhage"]:
        deep = rng.random() < 0.5
        if deep:
            box = (anatomy.coords[1] > -35) & (anatomy.coords[1] < 15) & (anatomy.coords[2] > -8) & (anatomy.coords[2] < 20)
            c = _brain_point(anatomy, rng, (gm + wm > 0.8) & box, min_abs_x=14)
        else:
            c = _brain_point(anatomy, rng, wm > 0.5)
        spec.lesions.append(Lesion("haemorrhage", c, float(rng.uniform(15, 21)), side_of(c[0]), region_of(c, deep)))
    if labels["infarct"]:
        sign = 1.0 if rng.random() < 0.5 else -1.0
        territory = str(rng.choice(["middle cerebral artery", "middle cerebral artery", "posterior cerebral artery", "anterior cerebral artery"]))
        spec.lesions.append(Lesion("infarct", (sign, 0.0, 0.0), float(rng.uniform(28, 38)), side_of(sign), territory))
    if labels["atrophy"]:
        spec.ventricle_scale = float(rng.uniform(1.9, 2.3))
        spec.cortex_loss = float(rng.uniform(0.6, 0.8))
    else:
        spec.ventricle_scale = float(rng.uniform(0.9, 1.12))  # normal variation
    if labels["midline_shift"]:
        spec.shift_mm = float(rng.uniform(12, 17)) * (1.0 if rng.random() < 0.5 else -1.0)
    spec.pose = {
        "angles": rng.uniform(-6, 6, size=3).tolist(),
        "shift": rng.uniform(-5, 5, size=3).tolist(),
        "scale": rng.uniform(0.93, 1.07, size=3).tolist(),
        # smooth random warp: 9 plane waves (amplitude mm, wave vector, phase, displaced axis)
        "warp": [[float(rng.uniform(-2.0, 2.0)), *rng.normal(0, 1, 3).tolist(), float(rng.uniform(0, 2 * math.pi)), i % 3] for i in range(9)],
    }
    return spec


# -- template-space channels --------------------------------------------------------------------

def _ball(coords: torch.Tensor, center, radii, rng: np.random.Generator, roughness: float = 0.25) -> torch.Tensor:
    """A soft ellipsoid with a lumpy border: [Z, Y, X] in [0, 1]."""
    d = torch.zeros_like(coords[0])
    for c in range(3):
        d += ((coords[c] - center[c]) / radii[c]) ** 2
    d = d.sqrt()
    lumps = torch.zeros_like(d)
    for _ in range(4):
        k = torch.from_numpy(rng.normal(0, 1, 3)).float() / 12.0
        phase = float(rng.uniform(0, 2 * math.pi))
        lumps += torch.sin(coords[0] * k[0] + coords[1] * k[1] + coords[2] * k[2] + phase)
    d = d * (1.0 + roughness * lumps / 4.0)
    return torch.sigmoid((1.0 - d) * 8.0)


def _crop(anatomy: Anatomy, center, extent_mm: float) -> tuple[slice, slice, slice]:
    """The (z, y, x) index box of the template within ``extent_mm`` of ``center`` (RAS mm)."""
    inv = np.linalg.inv(anatomy.affine)
    lo = inv[:3, :3] @ (np.asarray(center) - extent_mm) + inv[:3, 3]
    hi = inv[:3, :3] @ (np.asarray(center) + extent_mm) + inv[:3, 3]
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    size = anatomy.maps.shape[1:][::-1]  # x, y, z
    box = [slice(max(0, int(np.floor(a))), min(n, int(np.ceil(b)) + 1)) for a, b, n in zip(lo, hi, size)]
    return box[2], box[1], box[0]


def present_channels(spec: StudySpec) -> tuple[str, ...]:
    """The tissue channels (CHANNELS order) that are not empty for this study's findings."""
    kinds = {lesion.kind for lesion in spec.lesions}
    present = {"gm", "wm", "csf", "mask"}
    if "mass" in kinds:
        present |= {"core", "oedema"}
    if "haemorrhage" in kinds:
        present |= {"blood", "oedema"}
    if "infarct" in kinds:
        present.add("infarct")
    return tuple(c for c in CHANNELS if c in present)


def template_channels(anatomy: Anatomy, spec: StudySpec, channels: tuple[str, ...] = CHANNELS) -> torch.Tensor:
    """[len(channels), Z, Y, X] tissue channels (all of CHANNELS by default, in the order asked)
    with the study's focal findings planted."""
    rng = np.random.default_rng(spec.seed)
    gm, wm, csf, mask = anatomy.maps
    core, oedema, blood, infarct = (torch.zeros_like(gm) for _ in range(4)) if spec.lesions else (None,) * 4
    brain = (gm + wm).clamp(0, 1) if spec.lesions else None
    for lesion in spec.lesions:
        r = lesion.radius
        if lesion.kind == "mass":
            box = _crop(anatomy, lesion.center, r * 3.0)
            coords = anatomy.coords[(slice(None), *box)]
            ball = _ball(coords, lesion.center, (r, r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)), rng)
            core[box] = torch.maximum(core[box], ball)
            spread = _ball(coords, lesion.center, (r * 2.3, r * 2.6, r * 2.2), rng, roughness=0.5)
            # vasogenic oedema follows the white matter
            oedema[box] = torch.maximum(oedema[box], spread * (wm[box] * 1.2 + 0.15).clamp(0, 1) * brain[box])
        elif lesion.kind == "haemorrhage":
            box = _crop(anatomy, lesion.center, r * 2.0)
            coords = anatomy.coords[(slice(None), *box)]
            bleed = _ball(coords, lesion.center, (r * rng.uniform(0.7, 1.0), r, r * rng.uniform(0.8, 1.2)), rng, roughness=0.15)
            blood[box] = torch.maximum(blood[box], bleed)
            rim = _ball(coords, lesion.center, (r * 1.6, r * 1.6, r * 1.6), rng) * brain[box]
            oedema[box] = torch.maximum(oedema[box], rim * 0.8)
        elif lesion.kind == "infarct":
            xs = anatomy.coords[0, 0, 0, :]
            cols = (xs * lesion.center[0] > -5).nonzero().flatten()
            box = (slice(None), slice(None), slice(int(cols.min()), int(cols.max()) + 1))
            coords = anatomy.coords[(slice(None), *box)]
            infarct[box] = torch.maximum(infarct[box], _territory(coords, lesion, rng) * brain[box])
    if spec.cortex_loss > 0:
        lost = gm * anatomy.periphery * spec.cortex_loss
        gm, csf = gm - lost, csf + lost
    if not spec.lesions:  # nothing occupies the tissue: the maps as they are
        make = {"gm": lambda: gm, "wm": lambda: wm, "csf": lambda: csf, "mask": lambda: mask}
        return torch.stack([make[c]() if c in make else torch.zeros_like(gm) for c in channels])
    occupied = (core + oedema + blood + infarct).clamp(0, 1)
    keep = 1.0 - occupied
    oedema = oedema * (1 - core)
    total = (core + oedema + blood + infarct).clamp(min=1.0)
    # lesions replace the tissue they occupy; the shares of a voxel add up to at most one
    make = {"gm": lambda: gm * keep, "wm": lambda: wm * keep, "csf": lambda: csf * keep, "mask": lambda: mask,
            "core": lambda: core / total, "oedema": lambda: oedema / total, "blood": lambda: blood / total,
            "infarct": lambda: infarct / total}
    return torch.stack([make[c]() for c in channels])


def _territory(coords: torch.Tensor, lesion: Lesion, rng: np.random.Generator) -> torch.Tensor:
    """A wedge of one hemisphere fanning out from the circle of Willis: an arterial territory."""
    sign = lesion.center[0]
    origin = torch.tensor([sign * 12.0, -8.0, -8.0])
    if lesion.region.startswith("middle"):
        direction = np.array([sign * 1.0, rng.uniform(-0.35, 0.35), rng.uniform(0.1, 0.6)])
    elif lesion.region.startswith("posterior"):
        direction = np.array([sign * 0.35, -1.0, rng.uniform(0.0, 0.4)])
    else:
        direction = np.array([sign * 0.12, 0.7, 0.8])
    direction = torch.from_numpy(direction / np.linalg.norm(direction)).float()
    rel = coords - origin[:, None, None, None]
    dist = (rel * rel).sum(0).sqrt().clamp(min=1e-3)
    cos = (rel * direction[:, None, None, None]).sum(0) / dist
    half_angle = math.radians(lesion.radius)
    inside_angle = torch.sigmoid((cos - math.cos(half_angle)) * 40.0)
    same_side = torch.sigmoid(coords[0] * sign * 0.8)
    return inside_angle * same_side * torch.sigmoid((dist - 20.0) * 0.3)


# -- scanner space to template space ----------------------------------------------------------

def _rotation(angles_deg) -> torch.Tensor:
    a, b, c = (math.radians(v) for v in angles_deg)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return (rz @ ry @ rx).float()


def scanner_to_template(points: torch.Tensor, spec: StudySpec) -> torch.Tensor:
    """Where each scanner-space point (RAS mm, [..., 3]) samples the template: pose, smooth random
    warp and the deformations of findings, composed (pulled back: structures move by +d)."""
    pose = spec.pose
    rot = _rotation(pose["angles"])
    p = (points - torch.tensor(pose["shift"])) @ rot  # inverse rotation (rot is orthonormal)
    p = p / torch.tensor(pose["scale"])
    d = torch.zeros_like(p)
    for amp, kx, ky, kz, phase, axis in pose["warp"]:
        k = torch.tensor([kx, ky, kz]) / 70.0
        d[..., int(axis)] += amp * torch.sin(p @ k + phase)
    # ventricles: magnified around their centre (atrophy widens them, normal brains vary a little)
    centre = torch.tensor([0.0, -18.0, 14.0])
    rel = p - centre
    weight = torch.exp(-(rel ** 2).sum(-1, keepdim=True) / (2 * 24.0 ** 2))
    q = centre + rel * (1.0 - (1.0 - 1.0 / spec.ventricle_scale) * weight)
    # mass effect: a mass pushes its surroundings outward a little
    for lesion in spec.lesions:
        if lesion.kind == "mass":
            c = torch.tensor(lesion.center)
            rel = q - c
            w = torch.exp(-(rel ** 2).sum(-1, keepdim=True) / (2 * (lesion.radius * 1.8) ** 2))
            q = c + rel * (1.0 - 0.25 * w)
    q = q - d
    if spec.shift_mm:
        # midline shift: the central structures (septum, ventricles, third ventricle) displaced sideways
        y0, z0 = -10.0, 12.0
        bump = torch.exp(-(q[..., 0] ** 2 / (2 * 32.0 ** 2) + (q[..., 1] - y0) ** 2 / (2 * 40.0 ** 2) + (q[..., 2] - z0) ** 2 / (2 * 30.0 ** 2)))
        q = q.clone()
        q[..., 0] = q[..., 0] - spec.shift_mm * bump
    return q


@dataclass
class Scan:
    contrast: str
    name: str  # series description / file stem
    data: np.ndarray  # int16 [X, Y, Z] (NIfTI order)
    affine: np.ndarray  # 4x4 voxel -> RAS mm


def scan_grid(rng: np.random.Generator, inplane_choices=(3.0, 3.3, 3.6), thick_choices=(5.0, 6.0)) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A clinical-looking axial grid over the field of view: (voxel -> RAS affine, shape (X, Y, Z))."""
    inplane = float(rng.choice(inplane_choices))
    spacing = np.array([inplane, inplane, float(rng.choice(thick_choices))])
    lo = np.array([FOV[0][0], FOV[1][0], FOV[2][0]])
    hi = np.array([FOV[0][1], FOV[1][1], FOV[2][1]])
    shape = tuple(int(v) for v in np.ceil((hi - lo) / spacing))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = lo
    if rng.random() < 0.5:  # half of the studies stored right-to-left (LAS), as DICOM converters often write them
        affine[0, 0] = -spacing[0]
        affine[0, 3] = lo[0] + spacing[0] * (shape[0] - 1)
    return affine, shape


def _sample(anatomy: Anatomy, channels: torch.Tensor, names: tuple[str, ...], spec: StudySpec, affine: np.ndarray,
            shape) -> dict[str, torch.Tensor]:
    """The tissue channels [1, C, Z, Y, X] (template; ``names`` says which) seen on a scanner grid:
    {channel: [X, Y, Z]}."""
    ii, jj, kk = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    vox = torch.stack([ii, jj, kk, torch.ones_like(ii)], dim=-1)  # [X, Y, Z, 4]
    world = vox @ torch.from_numpy(affine.T).float()
    q = scanner_to_template(world[..., :3], spec)
    inv = torch.from_numpy(np.linalg.inv(anatomy.affine).T).float()
    tvox = torch.cat([q, torch.ones_like(q[..., :1])], -1) @ inv
    dims = torch.tensor([channels.shape[4], channels.shape[3], channels.shape[2]], dtype=torch.float32)  # X, Y, Z sizes
    grid = (tvox[..., :3] / (dims - 1)) * 2 - 1  # normalised (x, y, z), as grid_sample wants
    sampled = F.grid_sample(channels, grid.permute(2, 1, 0, 3)[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    return {name: c.permute(2, 1, 0) for name, c in zip(names, sampled)}


def render_study(anatomy: Anatomy, spec: StudySpec) -> list[Scan]:
    """The scans of a study as NIfTI-ready int16 volumes [X, Y, Z] with their affines. The
    structural scans share one slice prescription; diffusion has its own, coarser one."""
    rng = np.random.default_rng(spec.seed + 1)
    names = present_channels(spec)  # empty channels (findings the study lacks) are not sampled
    channels = template_channels(anatomy, spec, names)[None]
    grids = {"structural": scan_grid(rng), "diffusion": scan_grid(rng, (3.6, 4.0), (5.0, 6.0))}
    seen = {}
    scans = []
    for contrast in spec.contrasts:
        kind = "diffusion" if contrast == "DWI" else "structural"
        if kind not in seen:
            seen[kind] = _sample(anatomy, channels, names, spec, *grids[kind])
        tissue = seen[kind]
        signal = sum(tissue[t] * v for t, v in CONTRASTS[contrast].items() if t in tissue)
        signal = signal * torch.sigmoid((tissue["mask"] - 0.35) * 30)  # no signal outside the head
        signal = signal * _bias_field(signal.shape, rng) * _texture(signal.shape, rng)
        scale = float(rng.uniform(400, 1800))
        noise = rng.standard_normal(size=(2, *signal.shape), dtype=np.float32) * np.float32(0.03)
        magnitude = np.sqrt((signal.numpy() + noise[0]) ** 2 + noise[1] ** 2)  # Rician, as magnitude images are
        data = np.clip(magnitude * scale, 0, 32767).astype(np.int16)
        scans.append(Scan(contrast, SERIES_NAMES[contrast], data, grids[kind][0]))
    return scans


def _smooth_random(shape, rng: np.random.Generator, coarse=(3, 4, 4)) -> torch.Tensor:
    low = torch.from_numpy(rng.normal(0, 1, size=(1, 1, *coarse)).astype(np.float32))
    return F.interpolate(low, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]


def _bias_field(shape, rng: np.random.Generator) -> torch.Tensor:
    return torch.exp(0.12 * _smooth_random(shape, rng, coarse=(4, 4, 3)))


def _texture(shape, rng: np.random.Generator) -> torch.Tensor:
    return 1.0 + 0.03 * _smooth_random(shape, rng, coarse=(24, 24, 12))
