"""Property probe: how linearly readable object attributes are from the slots (grounding).

After Neural Slot Interpreters' question "does a slot carry its object's properties?", with the
simpler, standard read-out: per video, slots are matched one-to-one to ground-truth objects by
mask IoU over the whole video (Hungarian), then a linear probe maps a matched slot's vector at
frame t (a sample for every frame where its object is visible) to the object's attributes:

- categorical attributes (strings, ints, bools; e.g. ``mesh`` id, ``texture``): softmax
  regression, accuracy;
- numeric ones (floats or lists, e.g. ``color`` RGB, ``size``, ``position`` = positions[t],
  ``quaternion``, ``mass``): ridge regression (strength picked on the last fifth of the train samples), R^2 (mean over
  output dimensions, as scikit-learn's ``r2_score``).

Beside the generator's attributes (world ``position``, physical ``size``), every object gets two
read from its ground-truth mask in frame t, so the probe asks what a camera-bound slot can know
with a walking camera: ``image_position`` (the mask's centroid, (y, x) in [0, 1] of the frame)
and ``image_area`` (the share of the frame it covers, square-rooted: an apparent size).

With Invariant Slot Attention (``grouper.invariant``) a slot is its vector followed by its
position and scale, as in ISA; ``egoslots evaluate`` then also scores the vector alone.

Probes are fit on train videos and scored on test videos; the ``chance`` column is the
majority class (categorical) or the train mean (numeric) scored the same way. Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from egoslots.pipeline import metrics
from egoslots.pipeline.slots import GEOMETRY_DIMS

SKIP_KEYS = {"id", "label", "name"}


def match_objects(
    pred_labels: torch.Tensor, true_labels: torch.Tensor, num_slots: int
) -> dict[int, int]:
    """Hungarian matching of present objects to slots by IoU over the video: {object label: slot}."""
    from scipy.optimize import linear_sum_assignment

    table, ids = metrics.contingency(true_labels, pred_labels, num_slots)
    iou, area = metrics.iou_from_table(table)
    present = (area[0] > 0).nonzero().flatten()
    if present.numel() == 0:
        return {}
    rows, cols = linear_sum_assignment(iou[0][present].numpy(), maximize=True)
    return {int(ids[1 + present[r]]): int(c) for r, c in zip(rows, cols)}


class SampleCollector:
    """Gathers (slot vector, attributes) samples per split from evaluated videos."""

    def __init__(self, read_attributes: Callable[[str], dict | None], num_slots: int):
        self.read_attributes = read_attributes
        self.num_slots = num_slots
        self.samples = {"train": [], "test": []}
        self.has_attributes = False

    def train(self, item: dict, result: dict) -> None:
        self.add("train", item, result)

    def test(self, item: dict, result: dict) -> None:
        self.add("test", item, result)

    def add(self, split: str, item: dict, result: dict) -> None:
        attrs = self.read_attributes(item["video_id"])
        objects = (attrs or {}).get("objects") or []
        if not objects or "masks" not in item:
            return
        self.has_attributes = True
        masks = result["masks"].get("model_decoder", result["masks"].get("model_attention"))
        true = item["masks"].long()  # (T, H, W)
        pred = metrics.masks_to_labels(masks, tuple(true.shape[-2:]))
        self.samples[split].extend(
            video_samples(result["slots"], pred, true, objects, self.num_slots)
        )


def video_samples(
    slots: torch.Tensor, pred: torch.Tensor, true: torch.Tensor, objects: list[dict], num_slots: int
) -> list[tuple[np.ndarray, dict]]:
    """(slot vector at t, attributes) for every matched object and frame t where it is visible."""
    match = match_objects(pred, true, num_slots)
    t = true.shape[0]
    visible = torch.stack(
        [torch.bincount(true[i].flatten(), minlength=256)[:256] > 0 for i in range(t)]
    )  # (T, 256)
    out = []
    for obj in objects:
        label = obj.get("id")
        if label is None or int(label) not in match:
            continue
        slot = match[int(label)]
        static, per_frame = split_attributes(obj, t)
        for i in range(t):
            if not visible[i, int(label)]:
                continue
            values = dict(static)
            values.update({name: series[i] for name, series in per_frame.items()})
            values.update(image_geometry(true[i] == int(label)))
            out.append((slots[i, slot].numpy().astype(np.float32), values))
    return out


def without_geometry(samples: list) -> list:
    """Samples whose slots end with Invariant Slot Attention's position and scale -> the slot
    vectors alone (what the probe reads when the geometry is left out)."""
    return [(x[:-GEOMETRY_DIMS], attrs) for x, attrs in samples]


def image_geometry(mask: torch.Tensor) -> dict:
    """Where an object appears and how big, from its (H, W) boolean mask in one frame:
    ``image_position`` = centroid (y, x) in [0, 1], ``image_area`` = sqrt(share of the frame)."""
    h, w = mask.shape
    ys, xs = mask.nonzero(as_tuple=True)
    centroid = [float(ys.double().mean() + 0.5) / h, float(xs.double().mean() + 0.5) / w]
    return {"image_position": centroid, "image_area": float(np.sqrt(len(ys) / (h * w)))}


def split_attributes(obj: dict, num_frames: int) -> tuple[dict, dict]:
    """An object's attributes -> (static {name: value}, per-frame {name: (T, ...) list}).

    A list of ``num_frames`` lists is per frame and loses its plural "s" (``positions`` (T, 3)
    -> ``position``, ``quaternions`` -> ``quaternion``); a dict with an ``id`` (the synthetic
    generator's ``mesh: {name, id}``) stands for that id; None and other dicts are left out.
    """
    static, per_frame = {}, {}
    for key, value in obj.items():
        if key in SKIP_KEYS or value is None:
            continue
        if isinstance(value, dict):
            if "id" in value:
                static[key] = value["id"]
            continue
        if (
            isinstance(value, list)
            and len(value) == num_frames
            and value
            and isinstance(value[0], list)
        ):
            per_frame[key[:-1] if key.endswith("s") else key] = value
        else:
            static[key] = value
    return static, per_frame


def is_categorical(value) -> bool:
    return isinstance(value, (str, bool, np.bool_)) or (isinstance(value, (int, np.integer)))


def fit_ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Closed-form ridge with an unpenalised bias: (D+1, O) weights for [x, 1]."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    reg = lam * torch.eye(xb.shape[1], dtype=x.dtype)
    reg[-1, -1] = 0
    return torch.linalg.solve(xb.T @ xb + reg, xb.T @ y)


def predict_linear(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1) @ w


def choose_lambda(x: torch.Tensor, y: torch.Tensor, grid=(1e-2, 1e-1, 1.0, 10.0, 100.0)) -> float:
    """Ridge strength by R^2 on the last fifth of the train samples (later videos), then refit on all."""
    cut = int(len(x) * 0.8)
    if cut < 2 or len(x) - cut < 2:
        return 1.0
    scores = []
    for lam in grid:
        w = fit_ridge(x[:cut], y[:cut], lam)
        score = r2_score(y[cut:], predict_linear(w, x[cut:]))
        scores.append(score if np.isfinite(score) else -np.inf)
    return float(grid[int(np.argmax(scores))])


def r2_score(y: torch.Tensor, pred: torch.Tensor) -> float:
    """Mean over output dims of 1 - SSE/SST (dims with zero variance left out)."""
    sse = ((y - pred) ** 2).sum(0)
    sst = ((y - y.mean(0)) ** 2).sum(0)
    keep = sst > 0
    if not keep.any():
        return float("nan")
    return float((1 - sse[keep] / sst[keep]).mean())


def fit_softmax(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-3, steps: int = 200
) -> SoftmaxProbe:
    """Multinomial logistic regression (L2 on the weights), fit with scipy's L-BFGS-B.

    scipy rather than torch.optim: importing torch.optim pulls in torch._dynamo (seconds).
    """
    from scipy.optimize import minimize

    xn = x.double().numpy()
    n, d = xn.shape
    onehot = np.eye(num_classes)[y.numpy()]
    xb = np.concatenate([xn, np.ones((n, 1))], axis=1)  # bias column

    def loss_and_grad(flat):
        w = flat.reshape(d + 1, num_classes)
        logits = xb @ w
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss = (
            -np.log(np.clip((p * onehot).sum(1), 1e-300, None)).mean()
            + weight_decay * (w[:-1] ** 2).sum()
        )
        grad = xb.T @ (p - onehot) / n
        grad[:-1] += 2 * weight_decay * w[:-1]
        return loss, grad.ravel()

    res = minimize(
        loss_and_grad,
        np.zeros((d + 1) * num_classes),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": steps},
    )
    return SoftmaxProbe(torch.from_numpy(res.x.reshape(d + 1, num_classes)))


class SoftmaxProbe:
    def __init__(self, weights: torch.Tensor):
        self.weights = weights  # (D + 1, classes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return predict_linear(self.weights, x.double())


def fit_and_score(train: list, test: list, seed: int = 0, min_samples: int = 4) -> dict:
    """Fit one probe per attribute on ``train`` samples and score it on ``test`` samples."""
    if len(train) < min_samples or len(test) == 0:
        return {"skipped": f"too few matched samples (train {len(train)}, test {len(test)})"}
    x_train = torch.from_numpy(np.stack([s[0] for s in train])).double()
    x_test = torch.from_numpy(np.stack([s[0] for s in test])).double()
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    names = sorted({k for _, attrs in train for k in attrs})
    out = {}
    for name in names:
        tr = [(i, a[name]) for i, (_, a) in enumerate(train) if name in a]
        te = [(i, a[name]) for i, (_, a) in enumerate(test) if name in a]
        if len(tr) < min_samples or not te:
            continue
        xi, xt = x_train[[i for i, _ in tr]], x_test[[i for i, _ in te]]
        if is_categorical(tr[0][1]):
            classes = sorted({str(v) for _, v in tr})
            index = {c: k for k, c in enumerate(classes)}
            y_train = torch.tensor([index[str(v)] for _, v in tr])
            y_test = torch.tensor([index.get(str(v), -1) for _, v in te])
            majority = int(torch.bincount(y_train).argmax())
            if len(classes) == 1:
                pred = torch.zeros_like(y_test)
            else:
                pred = fit_softmax(xi, y_train, len(classes))(xt).argmax(1)
            out[name] = {
                "measure": "accuracy",
                "score": float((pred == y_test).double().mean()),
                "chance": float((y_test == majority).double().mean()),
                "classes": len(classes),
                "n_train": len(tr),
                "n_test": len(te),
            }
        else:
            try:
                y_train = torch.from_numpy(
                    np.stack([np.ravel(np.asarray(v, dtype=np.float64)) for _, v in tr])
                )
                y_test = torch.from_numpy(
                    np.stack([np.ravel(np.asarray(v, dtype=np.float64)) for _, v in te])
                )
            except (TypeError, ValueError):
                continue  # ragged or non-numeric: not a probe target
            w = fit_ridge(xi, y_train, choose_lambda(xi, y_train))
            out[name] = {
                "measure": "R^2",
                "score": r2_score(y_test, predict_linear(w, xt)),
                "chance": r2_score(y_test, y_train.mean(0).expand_as(y_test)),
                "n_train": len(tr),
                "n_test": len(te),
            }
    if not out:
        return {"skipped": "no attribute had enough matched samples"}
    return {"attributes": out, "n_train": len(train), "n_test": len(test)}
