"""PuLID's face front end: a face photo -> (id_cond [B, 1280], five EVA-CLIP hidden states).

The official pipeline (PuLID, Guo et al. 2024; its FLUX code's ``get_id_embedding``) chains:
InsightFace's antelopev2 -- the SCRFD detector (``scrfd_10g_bnkps.onnx``) and the ArcFace
recogniser (``glintr100.onnx``), both ONNX, run here through ``onnxruntime`` -- for the largest
face's raw 512-d embedding; a 512x512 FFHQ-template alignment of the face; BiSeNet face parsing
(background, clothes, ears, neck, hat -> white); grey; 336x336 bicubic; OpenAI-CLIP normalisation;
EVA02-CLIP-L-14-336 (:mod:`engine.models.eva_clip`), whose L2-normalised embedding joins the
ArcFace one. The models are the user's files: :meth:`PulidFaceEmbedder.from_files`.

Differences from the reference, by design: one detector (SCRFD's five landmarks also place the
512 crop; the reference runs facexlib's RetinaFace for that and may pick another face in a group
photo); similarity transforms by least squares (Umeyama), not OpenCV's LMedS; warps by
``grid_sample`` (bilinear, as ``cv2.warpAffine``; crops rounded to 8 bits as OpenCV's are).
Face parsing is an optional callable (``parser(face [1, 3, 512, 512], ImageNet-normalised RGB) ->
labels [512, 512]`` in BiSeNet's 19 classes, facexlib's input); without it the whole crop is kept.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The five landmarks (eyes, nose, mouth corners) of ArcFace's 112x112 crop and FFHQ's 512x512 one.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                        [70.7299, 92.2041]])
FFHQ_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
                     [313.08905, 371.15118]])
PARSING_BACKGROUND = (0, 7, 8, 9, 14, 15, 16, 18)  # BiSeNet: background, ears, earring, neck, necklace, cloth, hat
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _onnx_session(path):
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("the face front end runs InsightFace's ONNX models through onnxruntime: "
                         "pip install onnxruntime (or onnxruntime-gpu)") from None
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ONNX model {str(path)!r} does not exist; give the file from InsightFace's antelopev2 pack")
    return onnxruntime.InferenceSession(str(path), providers=onnxruntime.get_available_providers())


# ------------------------------------------------------------------ alignment
def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, shift) mapping points ``src`` onto ``dst`` in the
    least-squares sense (Umeyama 1991), as ``skimage.transform.SimilarityTransform.estimate``."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # no reflections
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = (sig * np.diag(sign)).sum() / s.var(0).sum()
    return np.concatenate([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]], 1)


def warp(image: Tensor, matrix: np.ndarray, size: int, border=(0.0, 0.0, 0.0)) -> Tensor:
    """``cv2.warpAffine(image, matrix, (size, size))``: image [3, H, W] float, bilinear, pixels
    outside take ``border`` (per channel, the image's scale)."""
    _, h, w = image.shape
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inv = torch.tensor(np.linalg.inv(full)[:2], dtype=torch.float64)  # output pixel -> input pixel
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    src = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ inv.T  # [size, size, 2] input x, y
    grid = torch.stack([(src[..., 0] * 2 + 1) / w - 1, (src[..., 1] * 2 + 1) / h - 1], -1)  # align_corners=False
    fill = torch.tensor(border, dtype=image.dtype)[:, None, None]
    out = F.grid_sample((image - fill)[None], grid[None].to(image.dtype), mode="bilinear", padding_mode="zeros",
                        align_corners=False)[0]
    return out + fill  # outside: 0 + fill


# ------------------------------------------------------------------ InsightFace models
class SCRFD:
    """InsightFace's SCRFD face detector (``scrfd_10g_bnkps.onnx``): boxes [N, 5] (x1, y1, x2, y2,
    score) and five landmarks [N, 5, 2] in the image's pixels, best first."""

    STRIDES = (8, 16, 32)
    ANCHORS = 2

    def __init__(self, path, input_size: int = 640, threshold: float = 0.5, nms: float = 0.4):
        self.session = _onnx_session(path)
        self.input = self.session.get_inputs()[0].name
        self.size, self.threshold, self.nms = input_size, threshold, nms
        if len(self.session.get_outputs()) != 9:
            raise ValueError(f"{Path(path).name}: not an SCRFD detector with landmarks (9 outputs expected, got "
                             f"{len(self.session.get_outputs())}); use antelopev2's scrfd_10g_bnkps.onnx")

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """image: [H, W, 3] uint8 RGB."""
        h, w = image.shape[:2]
        if h / w > 1:  # letterbox into the top-left corner of a square canvas
            nh, nw = self.size, int(self.size / (h / w))
        else:
            nw, nh = self.size, int(self.size * (h / w))
        scale = nh / h
        small = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(nh, nw), mode="bilinear",
                              align_corners=False)[0]
        canvas = torch.zeros(3, self.size, self.size)
        canvas[:, :nh, :nw] = small.round().clamp(0, 255)
        blob = ((canvas - 127.5) / 128.0)[None].numpy().astype(np.float32)  # RGB, [1, 3, S, S]
        outs = self.session.run(None, {self.input: blob})
        boxes, points = [], []
        for level, stride in enumerate(self.STRIDES):
            scores = outs[level].reshape(-1)
            dist = outs[level + 3].reshape(-1, 4) * stride
            kps = outs[level + 6].reshape(-1, 10) * stride
            g = self.size // stride
            ys, xs = np.mgrid[:g, :g]
            centres = np.repeat(np.stack([xs.ravel(), ys.ravel()], -1) * stride, self.ANCHORS, axis=0).astype(np.float32)
            keep = scores >= self.threshold
            c = centres[keep]
            box = np.concatenate([c - dist[keep][:, :2], c + dist[keep][:, 2:]], 1)
            boxes.append(np.concatenate([box, scores[keep][:, None]], 1))
            points.append((np.tile(c, 5) + kps[keep]).reshape(-1, 5, 2))
        boxes, points = np.concatenate(boxes), np.concatenate(points)
        boxes[:, :4] /= scale
        points /= scale
        order = boxes[:, 4].argsort()[::-1]  # InsightFace's order, ties included
        keep = _nms(boxes[order], self.nms)
        return boxes[order][keep], points[order][keep]


def _nms(boxes: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression over score-sorted boxes (InsightFace's +1 pixel areas)."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = np.arange(len(boxes)), []
    while order.size:
        i = order[0]
        keep.append(int(i))
        xx1, yy1 = np.maximum(x1[i], x1[order[1:]]), np.maximum(y1[i], y1[order[1:]])
        xx2, yy2 = np.minimum(x2[i], x2[order[1:]]), np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][iou <= threshold]
    return keep


class ArcFace:
    """InsightFace's ArcFace recogniser (``glintr100.onnx``): the raw (not normalised) embedding of
    the face whose five landmarks are given, from its 112x112 ArcFace-template crop."""

    def __init__(self, path):
        self.session = _onnx_session(path)
        inp = self.session.get_inputs()[0]
        self.input, self.size = inp.name, int(inp.shape[2]) if isinstance(inp.shape[2], int) else 112
        # Models exported from MXNet normalise inside the graph (a Sub and a Mul among the first nodes)
        try:
            import onnx
        except ImportError:
            raise ValueError("ArcFace reads its ONNX graph to find its input normalisation: pip install onnx "
                             "(or pip install 'overpaint[faces]')") from None

        nodes = [n.op_type for n in onnx.load(str(path)).graph.node[:8]]
        inside = any(op in ("Sub", "_minus") for op in nodes) and any(op in ("Mul", "_mul") for op in nodes)
        self.mean, self.std = (0.0, 1.0) if inside else (127.5, 127.5)

    def crop(self, image: Tensor, landmarks: np.ndarray) -> Tensor:
        """image [3, H, W] in 0..255 -> the [3, size, size] ArcFace crop."""
        return warp(image, similarity(landmarks, ARCFACE_112 * self.size / 112), self.size)

    def __call__(self, image: Tensor, landmarks: np.ndarray) -> np.ndarray:
        crop = self.crop(image, landmarks).round().clamp(0, 255)  # OpenCV warps uint8 images to uint8
        blob = ((crop - self.mean) / self.std)[None].numpy().astype(np.float32)
        return self.session.run(None, {self.input: blob})[0].reshape(-1)


# ------------------------------------------------------------------ the front end
class PulidFaceEmbedder:
    """``fn(images [B, 3, H, W] in [0, 1]) -> (id_cond [B, 1280], [5 x [B, 577, 1024]])`` for
    ``FluxPipeline.load_pulid(path, face_embedder=fn)``."""

    def __init__(self, detector, recognizer, vision_tower, parser=None):
        self.detector, self.recognizer, self.tower, self.parser = detector, recognizer, vision_tower, parser

    @classmethod
    def from_files(cls, antelopev2, eva_clip, parser=None) -> "PulidFaceEmbedder":
        """``antelopev2``: the folder of InsightFace's pack (scrfd_10g_bnkps.onnx, glintr100.onnx);
        ``eva_clip``: EVA02-CLIP-L-14-336 as .safetensors."""
        from .models.eva_clip import EvaVisionTower

        folder = Path(antelopev2)
        return cls(SCRFD(folder / "scrfd_10g_bnkps.onnx"), ArcFace(folder / "glintr100.onnx"),
                   EvaVisionTower.from_file(eva_clip), parser)

    def face(self, image: Tensor) -> tuple[np.ndarray, Tensor]:
        """(ArcFace embedding [512], the aligned 512x512 face [3, 512, 512] in [0, 1]) of the largest face."""
        u8 = (image.clamp(0, 1) * 255).round()  # [3, H, W]
        boxes, points = self.detector(u8.permute(1, 2, 0).to(torch.uint8).numpy())
        if not len(boxes):
            raise ValueError("no face found in the identity image; give a photo with one clearly visible face")
        big = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
        arc = self.recognizer(u8, points[big])
        aligned = warp(u8, similarity(points[big], FFHQ_512), 512, border=(132.0, 133.0, 135.0))  # facexlib's grey
        return arc, (aligned.round().clamp(0, 255) / 255)

    def vision_input(self, face: Tensor) -> Tensor:
        """The aligned face [3, 512, 512] -> EVA-CLIP's input [3, S, S]: background white (with a
        parser), grey, bicubic resize, OpenAI-CLIP normalisation."""
        if self.parser is not None:
            normed = (face - torch.tensor((0.485, 0.456, 0.406))[:, None, None]) / torch.tensor(
                (0.229, 0.224, 0.225))[:, None, None]
            labels = torch.as_tensor(self.parser(normed[None]))  # [512, 512] BiSeNet classes
            bg = torch.isin(labels.reshape(face.shape[1:]), torch.tensor(PARSING_BACKGROUND))
            face = torch.where(bg, torch.ones_like(face), face)
            grey = (0.299 * face[0] + 0.587 * face[1] + 0.114 * face[2]).expand(3, -1, -1)
            face = torch.where(bg, face, grey)
        else:
            face = (0.299 * face[0] + 0.587 * face[1] + 0.114 * face[2]).expand(3, -1, -1)
        s = self.tower.config.image_size
        x = F.interpolate(face[None], size=(s, s), mode="bicubic", align_corners=False)[0]
        return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        arcs, inputs = [], []
        for image in images.float().cpu():
            arc, face = self.face(image)
            arcs.append(torch.from_numpy(np.asarray(arc, np.float32)))
            inputs.append(self.vision_input(face))
        p = next(self.tower.parameters())
        emb, hidden = self.tower(torch.stack(inputs).to(p.device, p.dtype))
        id_cond = torch.cat([torch.stack(arcs).to(emb.device, torch.float32), F.normalize(emb.float(), dim=-1)], -1)
        return id_cond, hidden
