"""PuLID's face front end (engine.faces) with tiny ONNX models built here: the similarity fit and
warp, SCRFD's decoding against InsightFace's written out, ArcFace's crop and normalisation rule,
and the whole front end feeding PuLID-Flux."""
import numpy as np
import pytest
import torch

import engine
from engine import faces
from engine.models.eva_clip import EvaVisionConfig, EvaVisionTower
from engine.tiny import make_tiny_pulid

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SIZE = 64  # the tiny detector's input


def _conv(name, inp, out, cin, cout, k, rng, scale=0.01, bias=0.0):
    w = numpy_helper.from_array((rng.standard_normal((cout, cin, k, k)) * scale).astype(np.float32), f"{name}_w")
    b = numpy_helper.from_array((rng.standard_normal(cout) * 0.1 + bias).astype(np.float32), f"{name}_b")
    return [helper.make_node("Conv", [inp, f"{name}_w", f"{name}_b"], [out], strides=[k, k], kernel_shape=[k, k])], [w, b]


def tiny_scrfd(path, score_bias=0.3, seed=0):
    """SCRFD's interface: per stride 8/16/32, scores [N, 1] (sigmoid), distances [N, 4], landmarks
    [N, 10], N = (64 / stride)^2 x 2 anchors, anchors fastest; outputs scores, boxes, landmarks."""
    rng = np.random.default_rng(seed)
    nodes, inits, outs = [], [], {"score": [], "bbox": [], "kps": []}
    shape = numpy_helper.from_array(np.array([0, 2, 3, 1], np.int64), "perm")
    for s in (8, 16, 32):
        for kind, ch, last in (("score", 2, 1), ("bbox", 8, 4), ("kps", 20, 10)):
            n, i = _conv(f"{kind}{s}", "input.1", f"{kind}{s}_c", 3, ch, s, rng, bias=score_bias if kind == "score" else 0.5)
            nodes += n
            inits += i
            src = f"{kind}{s}_c"
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [src], [f"{kind}{s}_s"]))
                src = f"{kind}{s}_s"
            nodes.append(helper.make_node("Transpose", [src], [f"{kind}{s}_t"], perm=[0, 2, 3, 1]))
            inits.append(numpy_helper.from_array(np.array([-1, last], np.int64), f"{kind}{s}_shape"))
            nodes.append(helper.make_node("Reshape", [f"{kind}{s}_t", f"{kind}{s}_shape"], [f"{kind}_{s}"]))
            outs[kind].append(helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, None))
    del shape
    graph = helper.make_graph(nodes, "scrfd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
                              outs["score"] + outs["bbox"] + outs["kps"], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def tiny_arcface(path, dim=16, normalise_inside=False, seed=0):
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "data"
    if normalise_inside:  # an MXNet export: (x - 127.5) * 0.0078125 inside the graph
        inits += [numpy_helper.from_array(np.array(127.5, np.float32), "m"), numpy_helper.from_array(np.array(1 / 128, np.float32), "s")]
        nodes += [helper.make_node("Sub", ["data", "m"], ["d0"]), helper.make_node("Mul", ["d0", "s"], ["d1"])]
        x = "d1"
    n, i = _conv("c", x, "c_out", 3, 8, 16, rng, scale=0.05)
    nodes += n + [helper.make_node("Flatten", ["c_out"], ["flat"])]
    inits += i + [numpy_helper.from_array((rng.standard_normal((dim, 8 * 7 * 7)) * 0.1).astype(np.float32), "fc_w")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w"], ["fc1"], transB=1))
    graph = helper.make_graph(nodes, "arcface", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _insightface_decode(outs, size, threshold, nms, det_scale):
    """InsightFace's SCRFD.detect / forward (model_zoo/scrfd.py), written out."""
    scores_list, bboxes_list, kpss_list = [], [], []
    for idx, stride in enumerate((8, 16, 32)):
        scores, bbox_preds, kps_preds = outs[idx], outs[idx + 3] * stride, outs[idx + 6] * stride
        h = w = size // stride
        anchor_centers = np.stack(np.mgrid[:h, :w][::-1], axis=-1).astype(np.float32)
        anchor_centers = (anchor_centers * stride).reshape((-1, 2))
        anchor_centers = np.stack([anchor_centers] * 2, axis=1).reshape((-1, 2))
        pos = np.where(scores >= threshold)[0]
        x1 = anchor_centers[:, 0] - bbox_preds[:, 0]
        y1 = anchor_centers[:, 1] - bbox_preds[:, 1]
        x2 = anchor_centers[:, 0] + bbox_preds[:, 2]
        y2 = anchor_centers[:, 1] + bbox_preds[:, 3]
        bboxes = np.stack([x1, y1, x2, y2], axis=-1)
        kpss = np.stack([anchor_centers[:, i % 2] + kps_preds[:, i] for i in range(10)], axis=-1).reshape(-1, 5, 2)
        scores_list.append(scores[pos])
        bboxes_list.append(bboxes[pos])
        kpss_list.append(kpss[pos])
    scores = np.vstack(scores_list)
    order = scores.ravel().argsort()[::-1]
    bboxes = np.vstack(bboxes_list) / det_scale
    kpss = np.vstack(kpss_list) / det_scale
    det = np.hstack((bboxes, scores)).astype(np.float32, copy=False)[order]
    return det, kpss[order]


def test_similarity_recovers_a_known_transform():
    a, s, t = 0.3, 1.7, np.array([12.0, -4.0])
    m = np.array([[s * np.cos(a), -s * np.sin(a)], [s * np.sin(a), s * np.cos(a)]])
    pts = faces.FFHQ_512 @ m.T + t
    fit = faces.similarity(faces.FFHQ_512, pts)
    np.testing.assert_allclose(fit, np.concatenate([m, t[:, None]], 1), atol=1e-9)


def test_warp_is_warp_affine():
    img = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(0))
    ident = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    torch.testing.assert_close(faces.warp(img, ident, 20)[:, :, :20], img[:, :, :20], atol=1e-6, rtol=0)
    shifted = faces.warp(img, np.array([[1.0, 0, 3], [0, 1.0, 2]]), 20, border=(0.5, 0.5, 0.5))  # dst = src + (3, 2)
    torch.testing.assert_close(shifted[:, 2:, 3:], img[:, :18, :17], atol=1e-6, rtol=0)
    torch.testing.assert_close(shifted[:, :2], torch.full_like(shifted[:, :2], 0.5), atol=1e-6, rtol=0)  # border
    torch.testing.assert_close(shifted[:, :, :3], torch.full_like(shifted[:, :, :3], 0.5), atol=1e-6, rtol=0)


def test_scrfd_decodes_as_insightface(tmp_path):
    import onnxruntime
    path = tiny_scrfd(tmp_path / "scrfd.onnx")
    det = faces.SCRFD(path, input_size=SIZE, threshold=0.5, nms=0.4)
    image = (np.random.default_rng(1).random((48, 40, 3)) * 255).astype(np.uint8)  # taller than wide
    boxes, points = det(image)
    assert len(boxes) > 0 and points.shape == (len(boxes), 5, 2)
    # InsightFace's path on the same letterboxed blob
    nh, nw = SIZE, int(SIZE / (48 / 40))
    small = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(nh, nw),
                                            mode="bilinear", align_corners=False)[0].round().clamp(0, 255)
    canvas = torch.zeros(3, SIZE, SIZE)
    canvas[:, :nh, :nw] = small
    outs = onnxruntime.InferenceSession(str(path)).run(None, {"input.1": ((canvas - 127.5) / 128)[None].numpy()})
    want, want_kps = _insightface_decode(outs, SIZE, 0.5, 0.4, nh / 48)
    keep = faces._nms(want, 0.4)
    np.testing.assert_allclose(boxes, want[keep], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(points, want_kps[keep], rtol=1e-5, atol=1e-4)


def test_arcface_crop_and_normalisation(tmp_path):
    plain = faces.ArcFace(tiny_arcface(tmp_path / "a.onnx"))
    inside = faces.ArcFace(tiny_arcface(tmp_path / "b.onnx", normalise_inside=True))
    assert (plain.mean, plain.std, inside.mean, inside.std) == (127.5, 127.5, 0.0, 1.0)
    # landmarks already on the template: the crop is the image itself
    img = (torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(2)) * 255).round()  # an 8-bit image
    torch.testing.assert_close(plain.crop(img, faces.ARCFACE_112), img, atol=1e-2, rtol=0)  # 0..255, float32 grid
    emb = plain(img, faces.ARCFACE_112)
    want = plain.session.run(None, {"data": ((img.round() - 127.5) / 127.5)[None].numpy()})[0].reshape(-1)
    np.testing.assert_allclose(emb, want, rtol=1e-4, atol=1e-4)


def test_missing_files_and_no_face(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        faces.SCRFD(tmp_path / "nope.onnx")
    det = faces.SCRFD(tiny_scrfd(tmp_path / "s.onnx", score_bias=-20.0), input_size=SIZE)  # finds nothing
    emb = faces.PulidFaceEmbedder(det, faces.ArcFace(tiny_arcface(tmp_path / "a.onnx")), None)
    with pytest.raises(ValueError, match="no face found"):
        emb(torch.rand(1, 3, 40, 40))


def test_front_end_feeds_pulid(tiny_flux_dir, tmp_path):
    # tiny PuLID: id_cond is 48 wide (ArcFace 16 + EVA 32), hidden states 32 wide
    cfg = EvaVisionConfig(image_size=28, patch_size=14, width=32, layers=6, heads=1, embed_dim=32,
                          hidden_layers=(1, 2, 3, 4, 5))
    torch.manual_seed(0)
    tower = EvaVisionTower(cfg).eval()
    parser = lambda x: (torch.arange(512 * 512).reshape(512, 512) % 19)  # noqa: E731  every class somewhere
    fe = faces.PulidFaceEmbedder(faces.SCRFD(tiny_scrfd(tmp_path / "s.onnx"), input_size=SIZE),
                                 faces.ArcFace(tiny_arcface(tmp_path / "a.onnx")), tower, parser=parser)
    image = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(3))
    id_cond, hidden = fe(image)
    assert id_cond.shape == (2, 48) and len(hidden) == 5 and hidden[0].shape == (2, 5, 32)
    torch.testing.assert_close(id_cond[:, 16:].norm(dim=-1), torch.ones(2))  # EVA part L2-normalised
    arc, face = fe.face(image[0])
    np.testing.assert_allclose(id_cond[0, :16].numpy(), arc, rtol=1e-6)  # the raw ArcFace embedding
    assert face.shape == (3, 512, 512)
    pipe = engine.load(tiny_flux_dir)
    pipe.load_pulid(make_tiny_pulid(tmp_path / "pulid.safetensors", pipe.transformer), face_embedder=fe)
    kw = dict(steps=2, height=32, width=32, seed=0, output_type="pt", progress=False)
    out = pipe.generate("a face", id_image=image[:1], **kw)
    same = pipe.generate("a face", id_embedding=fe(image[:1]), **kw)
    torch.testing.assert_close(out, same, rtol=0, atol=0)
