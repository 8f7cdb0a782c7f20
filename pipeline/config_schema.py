"""The typed schema of every egoslots config: names, types, defaults and the values each key accepts.

Defaults follow the users' integrated-model docs (7 slots x 128, vocab 4096, dVAE and STEVE
decoder on) and the published SlotContrast / STEVE settings in ``shared/reference.md``.
Section names keep the ones users already know (``globals``, ``dataset``, ``grouper``,
``model.loss_weights``, ``losses.loss_ss``, ``optimizer``, ``trainer``).

Read top to bottom: :class:`Limit` (what a key accepts) and the helpers that declare it beside
each field (:func:`limited`, :func:`free`); the sections, one dataclass each (the run machinery
that every training stage shares is :class:`RunMachinery`); :data:`ALIASES`, every key that
stands for another; and :func:`schema_limits`, the {dotted key: Limit} table that
``pipeline/config.py`` checks values against. docs/config.md describes the same in words.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any

# dvae.arch: whose conv block the dVAE's hidden layers use (see pipeline/dvae.py).
DVAE_ARCHS = ("steve", "slate")
# decoder.mixing: what mixes the per-slot reconstructions (see pipeline/decoders.py).
DECODER_MIXINGS = ("alpha", "attention")
# decoder.positions: what the decoder knows of where a token is (see pipeline/decoders.py).
DECODER_POSITIONS = ("learned", "none")


# --------------------------------------------------------------------------------------------
# What values a key accepts, beyond its type: declared beside each field
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limit:
    """The values one config key accepts (a ``None`` value is judged by the key's type alone).

    Numbers must be finite and inside ``[low, high]`` (``low_open`` / ``high_open`` exclude the
    end); ``choices`` lists the allowed strings; ``kind`` names a rule of its own: ``name`` (a
    folder name under ``runs/``), ``path`` (``~`` and ``$VARS`` expanded, never a file where a
    folder is meant), ``devices`` (Lightning's ``devices``: ``auto``, N >= 1, -1 or a list of
    GPU indices), ``device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    kind: str | None = None

    def describe(self) -> str:
        """The allowed values in words, for the error line."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.kind is not None:
            return KIND_WORDS[self.kind]
        low = "" if self.low is None else f"{'(' if self.low_open else '['}{_num(self.low)}"
        high = "" if self.high is None else f"{_num(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None and self.high is not None:
            return f"a finite number in {low}, {high}"
        if self.low is not None:
            return f"a finite number {'>' if self.low_open else '>='} {_num(self.low)}"
        return f"a finite number {'<' if self.high_open else '<='} {_num(self.high)}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


KIND_WORDS = {
    "name": "a folder name of 1-100 characters from A-Z a-z 0-9 . _ - + = @ (not '.' or '..')",
    "folder": "a folder (~ and $VARS are expanded; not a file)",
    "path": "a path (~ and $VARS are expanded)",
    "devices": "auto, a number of devices >= 1, -1 (all) or a list of device indices",
    "device": "auto, cpu, cuda or cuda:N",
}


def at_least(low: float, high: float | None = None) -> Limit:
    return Limit(low=low, high=high)


def above(low: float, high: float | None = None, high_open: bool = False) -> Limit:
    return Limit(low=low, low_open=True, high=high, high_open=high_open)


def one_of(*choices: str) -> Limit:
    return Limit(choices=choices)


COUNT = at_least(1)  # steps, sizes, counts: 1 or more
STEPS = at_least(1, 10**9)
STEPS_OR_NONE = at_least(0, 10**9)  # 0 = none / never
WORKERS = at_least(0, 256)
# Whole-model half precision (16-true, bf16-true) is not among them: the models keep fp32 parts.
PRECISIONS = one_of("auto", "32", "32-true", "fp32", "bf16", "bf16-mixed", "16-mixed")
ACCELERATORS = one_of("auto", "cpu", "gpu", "cuda")
FRACTION = at_least(0, 1)
BELOW_ONE = Limit(low=0, high=1, high_open=True)  # [0, 1)
NAME, FOLDER, PATH = Limit(kind="name"), Limit(kind="folder"), Limit(kind="path")
DEVICE, DEVICES = Limit(kind="device"), Limit(kind="devices")


def limited(default: Any = dataclasses.MISSING, limit: Limit | None = None, *, factory=None):
    """A field whose values must satisfy ``limit`` (for a list: every item)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"limit": limit})
    return field(default=default, metadata={"limit": limit})


def free(default: Any = dataclasses.MISSING, why: str = "", *, factory=None):
    """A field that takes any value of its type on purpose; ``why`` says so (and who checks it)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"free": why})
    return field(default=default, metadata={"free": why})


def with_limits(**limits: Limit):
    """Class decorator: the limits of a class whose field lines stay plain (``name=Limit``);
    the same as declaring each with :func:`limited`."""

    def apply(cls):
        own = {f.name: f for f in dataclasses.fields(cls)}
        for name, limit in limits.items():
            own[name].metadata = {**own[name].metadata, "limit": limit}  # type: ignore[misc]
        return cls

    return apply


# A field fed by an alias (a global of the users' docs): its default is installed from ALIASES
# when the schema is built (pipeline/config.py), never restated here. "???" is OmegaConf's MISSING.
FED = "???"


# --------------------------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------------------------
@dataclass
class Globals:
    NUM_SLOTS: int = limited(7, at_least(1, 1024))
    SLOT_DIM: int = limited(128, at_least(1, 65536))
    VOCAB_SIZE: int = limited(4096, at_least(2, 65536))
    USE_SILICON_VIT: bool = True
    SILICON_MODEL: str = free("dino_say_vitb14", "a model name: the backbone factory checks it")
    # The frozen encoder; by default a silicon-menagerie ViT or DINOv2 per USE_SILICON_VIT (ALIASES).
    BACKBONE: str = free(FED, "a model name: the backbone factory checks it")
    USE_DVAE: bool = True
    USE_STEVE_DECODER: bool = True
    NUM_FRAMES: int = limited(4, at_least(1, 100000))  # training clip length T
    BATCH_SIZE_PER_GPU: int = limited(16, at_least(1, 1 << 20))
    IMAGE_SIZE: int = limited(224, at_least(1, 8192))  # ViT input size
    # cached frame size (dVAE input; token grid = FRAME_SIZE / 4)
    FRAME_SIZE: int = limited(128, at_least(4, 8192))


@with_limits(
    videos=at_least(1, 1 << 20),
    frames=at_least(1, 1 << 20),
    size=at_least(8, 4096),
    seed=at_least(0, 2**31 - 1),
    min_objects=at_least(1, 64),
    max_objects=at_least(1, 64),
    fps=above(0, 1000),
    scene=one_of("tabletop", "room", "clutter"),
)
@dataclass
class SyntheticData:
    videos: int = 24
    frames: int = 24
    size: int = 128
    seed: int = 0
    min_objects: int = 3
    max_objects: int = 10
    fps: float = 12.0
    scene: str = "tabletop"  # tabletop | room | clutter (docs/synthetic.md)


@dataclass
class Hdf5Keys:
    # Defaults fit a (V, T, H, W, C) `image` array with (V, T, H, W) `mask` label maps.
    # EfficientMORL's multi-object files need: image_key=imgs mask_key=masks layout=image.
    image_key: str = free("image", "a dataset name inside the file: the source checks it")
    mask_key: str | None = free("mask", "a dataset name inside the file: the source checks it")
    # Leading axes of the image array: "video" = (V, T, H, W, C); "image" = (N, H, W, C), each
    # image a one-frame video.
    layout: str = limited("video", one_of("video", "image"))


SHARDS = "a brace pattern of tar files: the webdataset source checks it"
MEMBER = "a member name inside the tar shards: the webdataset source checks it"


@dataclass
class WebdatasetShards:
    # Tar shards as SlotContrast's data/save_movi.py and save_ytvis2021.py write them: members
    # <key>.video.npy (T, H, W, 3) uint8 and <key>.segmentations.npy (T, H, W, 1) label maps
    # (MOVi) or (T, H, W, I) one channel per instance (YT-VIS). Brace patterns as in
    # SlotContrast's configs ("movi_c/movi_c-train-{000000..000304}.tar"), relative to
    # dataset.path (a folder or an fsspec URL) unless absolute. The pattern gives the split.
    train_shards: str | None = free(None, SHARDS)
    val_shards: str | None = free(None, SHARDS)
    test_shards: str | None = free(None, SHARDS)
    video_key: str = free("video", MEMBER)  # member <key>.<video_key>.npy
    # null: no masks (SlotContrast's --only-video shards)
    mask_key: str | None = free("segmentations", MEMBER)


@dataclass
class SplitFractions:
    val: float = limited(0.1, FRACTION)
    test: float = limited(0.1, FRACTION)


@dataclass
class Dataset:
    source: str = limited("synthetic", one_of("frames", "video", "hdf5", "webdataset", "synthetic"))
    path: str = limited("${work_dir}/data/synthetic", PATH)
    fps: float | None = limited(None, above(0, 1000))  # video files: subsample to this frame rate
    hdf5: Hdf5Keys = field(default_factory=Hdf5Keys)
    webdataset: WebdatasetShards = field(default_factory=WebdatasetShards)
    split: SplitFractions = field(default_factory=SplitFractions)
    synthetic: SyntheticData = field(default_factory=SyntheticData)
    max_videos: int | None = limited(None, COUNT)
    skip_bad: bool = False
    # Clips for training: length T, stride between clip starts, frame step within a clip.
    ep_length: int = limited(FED, at_least(1, 100000))
    clip_stride: int = limited(1, at_least(1, 100000))
    frame_step: int = limited(1, at_least(1, 100000))
    batch_size: int = limited(FED, at_least(1, 1 << 20))
    # 0: read ahead in a thread of the training process (fastest from a local store: a batch is
    # a few preadv calls); N > 0: N worker processes (a remote store, where each clip is a request).
    num_workers: int = limited(0, WORKERS)


@dataclass
class Backbone:
    name: str = free(FED, "a model name, patch-pixels or self: the backbone factory checks it")
    # local .pth; else $EGOSLOTS_WEIGHTS/<name>.pth; else fetched by name into the Hugging Face
    # cache (eminorhan/<name>, timm's hub id) unless HF_HUB_OFFLINE=1
    checkpoint: str | None = limited(None, PATH)
    # block whose output is the feature: 0-based (timm blocks.N), <0 from the end; None = last
    block: int | None = limited(None, at_least(-1000, 1000))
    final_norm: bool = False
    input_size: int = limited(FED, at_least(1, 8192))
    patch_size: int | None = limited(
        None, at_least(1, 8192)
    )  # patch-pixels only (ViTs know theirs)
    # patch-pixels: fixed random projection to this dim
    proj_dim: int | None = limited(None, at_least(1, 65536))
    # default: ImageNet, unless the backbone says otherwise
    mean: list[float] | None = limited(None, at_least(-1000, 1000))
    std: list[float] | None = limited(None, above(0, 1000))
    # name=self: the pretrain-encoder run whose encoder.pth to load; None = this config's run,
    # <work_dir>/runs/<pretrain_encoder.run_name> (filled in when the config is loaded).
    encoder_run: str | None = limited(None, FOLDER)


@dataclass
class Augment:
    hflip: str = limited("none", one_of("none", "cache"))


@dataclass
class Extract:
    batch_size: int = limited(16, at_least(1, 1 << 20))
    num_workers: int = limited(2, WORKERS)
    # storage dtype: float16 | bfloat16 | int8 | float32
    dtype: str = limited("float16", one_of("float16", "bfloat16", "int8", "float32"))
    compute: str = limited("auto", one_of("auto", "fp32", "bf16"))
    device: str = limited("auto", DEVICE)
    frame_size: int = limited(FED, at_least(4, 8192))
    # Unit of work, resume and sharding: one zarr shard file per array per chunk.
    frames_per_chunk: int = limited(64, at_least(1, 1 << 20))
    # Frames per inner (read) chunk inside a shard: a random clip reads only the inner chunks
    # it covers. Should divide frames_per_chunk (else the largest divisor below it is used).
    inner_chunk: int = limited(1, at_least(1, 1 << 20))
    # none | zstd | blosc (lz4 + byte shuffle); see docs/store-format.md
    compressor: str = limited("none", one_of("none", "zstd", "blosc"))


@dataclass
class RunMachinery:
    """How a training stage runs (Lightning): the same nine keys under ``pretrain_encoder``
    (stage 0), ``dvae`` (stage 2) and ``trainer`` (stage 3). Each of those sections subclasses
    this one and redeclares only the defaults it changes; a redeclared field keeps the limit
    declared here unless it declares its own (with its reason)."""

    max_steps: int = limited(100000, STEPS)
    # auto: the faster of 32 and bf16-mixed by a probe of this step
    # (stages/machinery/runtime.py) | 32 | bf16-mixed
    precision: str = limited("auto", PRECISIONS)
    accelerator: str = limited("auto", ACCELERATORS)  # auto | cpu | gpu
    # Multi-GPU / multi-node (Lightning DDP): batch sizes are per device, the global batch is
    # batch_size x devices x num_nodes.
    devices: Any = limited(1, DEVICES)
    num_nodes: int = limited(1, at_least(1, 100000))
    strategy: str = free("auto", "Lightning's strategy names (ddp, fsdp, ...): Lightning checks it")
    ckpt_every: int = limited(1000, STEPS)
    log_every: int = limited(50, STEPS)
    image_every: int = limited(1000, STEPS_OR_NONE)  # pictures in TensorBoard (0 = never)


@dataclass
class Geco:
    # GECO (EfficientMORL) for the dVAE: a multiplier softplus(beta) on reconstruction that rises
    # while the error is above `target` and falls below it; balances dvae.kl_weight's prior term.
    enabled: bool = False
    target: float = limited(0.01, above(0, 1e6))  # target reconstruction error (per pixel MSE)
    # step size of beta per unit of (summed per-frame) constraint
    eta: float = limited(1.0e-6, at_least(0, 1e6))
    ema: float = limited(0.99, BELOW_ONE)
    warmup_steps: int = limited(1000, STEPS_OR_NONE)  # beta stays at beta_init for this many steps
    beta_init: float = limited(1.0, above(0, 1e6))
    beta_min: float = limited(0.55, above(0, 1e6))


@dataclass
class Dvae(RunMachinery):
    """Stage 2, `egoslots pretrain-dvae` and `tokenize`. Multi-GPU / multi-node pretraining as
    trainer.* for stage 3 (:class:`RunMachinery`); tokenization runs on rank 0."""

    max_steps: int = 30000
    run_name: str = limited("dvae", NAME)
    vocab_size: int = limited(FED, at_least(2, 65536))
    hidden: int = limited(64, at_least(1, 4096))
    # steve: STEVE's conv blocks (conv with bias -> ReLU); slate: SLATE's (conv -> GroupNorm ->
    # ReLU), what egoslots used before this key existed. Part of the dVAE's identity.
    arch: str = limited("steve", one_of(*DVAE_ARCHS))
    lr: float = limited(3.0e-4, above(0, 10))
    batch_size: int = limited(32, at_least(1, 1 << 20))
    tau_start: float = limited(1.0, above(0, 1000))
    tau_final: float = limited(0.1, above(0, 1000))
    tau_steps: int = limited(30000, STEPS)
    kl_weight: float = limited(0.0, at_least(0, 1e6))  # optional KL to a uniform prior over codes
    geco: Geco = field(default_factory=Geco)
    num_workers: int = limited(0, WORKERS)  # as dataset.num_workers: 0 = a read-ahead thread
    tokenize_batch_size: int = limited(64, at_least(1, 1 << 20))
    tokenize_device: str = limited("auto", DEVICE)  # auto (cuda if available) | cpu | cuda:N


@dataclass
class PretrainEncoder(RunMachinery):
    """Stage 0, `egoslots pretrain-encoder`: DINO self-distillation of a ViT on the dataset's own
    train frames (silicon-menagerie's recipe). Defaults are DINO's (facebookresearch/dino
    main_dino.py, ViT-S/16 at 224 px); DINO's epoch counts are steps here. `backbone.name: self`
    extracts features with the result; `egoslots run` trains it first."""

    run_name: str = limited("encoder", NAME)
    # The ViT (DINO's vision_transformer.py shape; vit_tiny 192/12/3, vit_small 384/12/6,
    # vit_base 768/12/12).
    patch_size: int = limited(16, at_least(1, 1024))
    embed_dim: int = limited(384, at_least(1, 65536))
    depth: int = limited(12, at_least(1, 256))
    num_heads: int = limited(6, at_least(1, 1024))
    mlp_ratio: float = limited(4.0, above(0, 64))
    drop_path_rate: float = limited(0.1, BELOW_ONE)  # stochastic depth of the student
    # Global crop size: frames are cached at this size (shorter side + centre crop, as stage 1).
    image_size: int = limited(FED, at_least(1, 8192))
    # train on every k-th frame of each train video (neighbours look alike)
    frame_step: int = limited(1, at_least(1, 100000))
    # Projection head (DINOHead): 3-layer MLP, l2-normalised bottleneck, weight-normed last layer.
    out_dim: int = limited(65536, at_least(1, 1 << 20))
    hidden_dim: int = limited(2048, at_least(1, 65536))
    bottleneck_dim: int = limited(256, at_least(1, 65536))
    norm_last_layer: bool = True
    # Multi-crop: 2 global crops (image_size) + num_local_crops local crops (local_size).
    # crops: batched = the whole batch at once in torch on the training device (3x faster on a
    # CPU, see docs/benchmarks.md); lightly = DINO's PIL pipeline per image in DataLoader workers.
    crops: str = limited("batched", one_of("batched", "lightly"))
    num_local_crops: int = limited(8, at_least(0, 64))
    local_size: int = limited(96, at_least(1, 8192))
    global_scale: list[float] = limited(limit=above(0, 1), factory=lambda: [0.4, 1.0])
    local_scale: list[float] = limited(limit=above(0, 1), factory=lambda: [0.05, 0.4])
    hflip: float = limited(0.5, FRACTION)
    color_jitter: float = limited(
        0.8, FRACTION
    )  # probability; strength DINO's (0.4, 0.4, 0.2, 0.1)
    color_strength: float = limited(1.0, at_least(0, 100))  # multiplies DINO's (0 = no jitter)
    grayscale: float = limited(0.2, FRACTION)
    # global 1, global 2, local
    blur: list[float] = limited(limit=FRACTION, factory=lambda: [1.0, 0.1, 0.5])
    # px, at 224 px crops
    blur_sigma: list[float] = limited(limit=above(0, 1000), factory=lambda: [0.1, 2.0])
    solarize: float = limited(0.2, FRACTION)  # second global crop only
    # Loss: centering and sharpening.
    student_temp: float = limited(0.1, above(0, 100))
    teacher_temp: float = limited(0.04, above(0, 100))
    warmup_teacher_temp: float = limited(0.04, above(0, 100))
    warmup_teacher_temp_steps: int = limited(0, STEPS_OR_NONE)
    center_momentum: float = limited(0.9, FRACTION)
    momentum_teacher: float = limited(0.996, FRACTION)  # EMA, cosine to 1 over max_steps
    # Optimisation: AdamW, lr = lr * global batch / 256 after warm-up, cosine to min_lr.
    batch_size: int = limited(64, at_least(1, 1 << 20))  # per device
    lr: float = limited(5.0e-4, above(0, 10))
    min_lr: float = limited(1.0e-6, at_least(0, 10))
    warmup_steps: int = limited(10000, STEPS_OR_NONE)
    weight_decay: float = limited(0.04, at_least(0, 100))
    weight_decay_end: float = limited(0.4, at_least(0, 100))
    clip_grad: float = limited(3.0, at_least(0, 1e6))  # per-parameter gradient norm (0 = off)
    freeze_last_layer_steps: int = limited(1000, STEPS_OR_NONE)
    num_workers: int = limited(2, WORKERS)


@dataclass
class Initializer:
    # fixed (SlotContrast) | gaussian (VideoSAUR, STEVE) | kmeans (egoslots: the first frame's
    # feature clusters, pipeline/slots.KMeansInit)
    name: str = limited("fixed", one_of("fixed", "gaussian", "kmeans"))
    # (restarts moved to inference.restarts; model.initializer.restarts still works: ALIASES)


@dataclass
class LossWeights:
    loss_featrec: float = limited(1.0, at_least(0, 1e6))
    loss_ss: float = limited(0.5, at_least(0, 1e6))
    loss_steve_ce: float = limited(1.0, at_least(0, 1e6))


@dataclass
class Model:
    num_slots: int = limited(FED, at_least(1, 1024))
    slot_dim: int = limited(FED, at_least(1, 65536))
    initializer: Initializer = field(default_factory=Initializer)
    loss_weights: LossWeights = field(default_factory=LossWeights)


@dataclass
class Grouper:
    n_iters: int = limited(2, at_least(1, 100))  # slot-attention iterations after the first frame
    n_iters_first: int = limited(3, at_least(1, 100))
    eps: float = limited(1.0e-8, above(0, 1))
    mlp_ratio: int = limited(4, at_least(1, 64))
    # Invariant Slot Attention (Biza et al. 2023, translation and scale): each slot also has a
    # position and a scale, sees the tokens in its own frame, and the decoder draws it there;
    # exports and the probe get (y, x, scale_y, scale_x) after each slot vector. Needs a square
    # token grid. false: SlotContrast's slot attention (published). See docs/discovery.md.
    invariant: bool = False
    # Slot Attention's soft position embedding (Locatello et al. 2020): a learned linear map of
    # each token's grid coordinates added to the cached features before the feature MLP, so the
    # slot vectors carry where their tokens are (the probe's position rows). Needs a square
    # token grid. false: SlotContrast's inputs (published). See docs/discovery.md.
    position_embedding: bool = False


@dataclass
class Predictor:
    enabled: bool = True
    num_heads: int = limited(4, at_least(1, 1024))
    ffn_ratio: int = limited(4, at_least(1, 64))
    # "published": SlotContrast's code scales attention logits by sqrt(head_dim) (q / head_dim**-0.5);
    # "standard": the usual 1/sqrt(head_dim). See pipeline/predictor.py.
    attn_scale: str = limited("published", one_of("published", "standard"))


@dataclass
class Decoder:
    hidden_dims: list[int] = limited(limit=at_least(1, 65536), factory=lambda: [1024, 1024, 1024])
    # How the per-slot reconstructions are mixed: "alpha" (SlotContrast: the decoder's own alpha
    # channel, softmax over slots) or "attention" (the slot-attention masks; an egoslots option
    # that discovers objects much sooner at small scale, see docs/discovery.md).
    mixing: str = limited("alpha", one_of(*DECODER_MIXINGS))
    # What the decoder knows of where a token is: "learned" (SlotContrast: a learned embedding
    # per token; slot-relative coordinates with grouper.invariant) or "none" (an egoslots option:
    # each slot decodes to one feature vector, so with attention mixing the feature loss is a
    # soft k-means distortion of the features and a slot cannot paint a whole region's layout;
    # needs decoder.mixing=attention). See docs/discovery.md.
    positions: str = limited("learned", one_of(*DECODER_POSITIONS))


@dataclass
class SteveDecoder:
    enabled: bool = FED  # type: ignore[assignment]
    num_blocks: int = limited(8, at_least(1, 256))
    num_heads: int = limited(4, at_least(1, 1024))
    d_model: int = limited(192, at_least(1, 65536))
    dropout: float = limited(0.1, BELOW_ONE)
    # true: the decoder's cross-entropy trains the decoder only, not the slots (STEVE's gradient
    # reaches slot attention: false). The slots are then shaped by SlotContrast's losses alone.
    detach_slots: bool = False


@dataclass
class LossSS:
    temperature: float = limited(0.1, above(0, 1e6))
    batch_contrast: bool = True
    all_gather: bool = False  # DDP: contrast against the global batch


@dataclass
class Losses:
    loss_ss: LossSS = field(default_factory=LossSS)


@dataclass
class ParamGroup:
    regex: str = free(".*", "a regular expression: pipeline/config.py compiles it")
    lr: float = limited(4.0e-4, above(0, 10))


@dataclass
class Optimizer:
    lr: float = limited(4.0e-4, above(0, 10))
    warmup_steps: int = limited(2500, STEPS_OR_NONE)
    decay: bool = True  # decay_final ** ((step - warmup) / (max_steps - warmup)) after warmup
    # the lr factor the decay reaches at trainer.max_steps: 0.5 is SlotContrast's; a short run
    # ends on a settled model with a smaller one (the demo: 0.02)
    decay_final: float = limited(0.5, above(0, 1))
    param_groups: list[ParamGroup] = field(default_factory=list)


@dataclass
class Trainer(RunMachinery):
    """Stage 3, `egoslots train-slots`."""

    ckpt_every: int = 2500
    # Stage 3's slot pictures have no "never": its callback draws at step 1 and every
    # max(1, N) steps, so 0 would mean every step. Hence 1 or more here.
    image_every: int = limited(5000, STEPS)
    gradient_clip_val: float = limited(0.05, at_least(0, 1e6))
    tf32: bool = True
    compile: bool = False
    val_every: int = limited(2500, STEPS)
    val_batches: int = limited(50, STEPS_OR_NONE)  # validation batches per check (0 = none)


@dataclass
class Evaluate:
    split: str = limited("test", one_of("train", "val", "test"))
    probe: bool = True  # property probe (needs per-object attributes, e.g. synthetic meta.json)
    max_videos: int | None = limited(None, COUNT)  # evaluate only the first N videos of the split
    # train videos the probe is fit on (None = all)
    probe_train_videos: int | None = limited(200, COUNT)
    # also score masks refined from the token grid to pixels with the video's colours
    # (pipeline/refine.py), beside the raw masks; needs the store's frames
    refine: bool = True
    # also score masks with each slot's connected parts made segments of their own, tracked
    # over the video (pipeline/components.py), raw and refined; colour k-means split the same way
    split_parts: bool = True


@dataclass
class Inference:
    """Settings read only where a trained model is applied (evaluate, export-slots, visualize).
    They are not part of what is trained: train-slots resumes whatever they are."""

    # Draws of a gaussian or kmeans initializer's first slots per video; the draw whose slots
    # reconstruct the first window's features best is kept, as k-means keeps the best of n_init runs
    # (1: one draw, the published behaviour; docs/discovery.md). Was model.initializer.restarts.
    restarts: int = limited(1, at_least(1, 4096))


@dataclass
class Config:
    work_dir: str = limited("./egoslots-work", FOLDER)
    run_name: str = limited("slots", NAME)
    seed: int = limited(0, at_least(0, 2**32 - 1))
    # Feature store that later stages read: a path, or a fingerprint under work_dir/stores.
    # None: the one complete store in work_dir that matches this config's extraction settings.
    store: str | None = limited(None, PATH)
    # Folder where extraction creates stores and later stages look for them: a local path or an
    # fsspec URL (s3://bucket/prefix, gs://..., file://...). None = work_dir/stores. Credentials
    # and endpoints come from the environment, never from configs (see docs/scaling.md).
    store_dir: str | None = limited(None, FOLDER)
    # dVAE run whose tokens stage 3 reads: a run directory; None = work_dir/runs/<dvae.run_name>.
    dvae_run: str | None = limited(None, FOLDER)
    # torch intra-op threads; 0 = EGOSLOTS_NUM_THREADS if set, else the CPUs this process may
    # use (affinity mask, cgroup CPU quota) less extraction's decode workers
    # (stages/machinery/runtime.py).
    num_threads: int = limited(0, at_least(0, 4096))
    globals: Globals = field(default_factory=Globals)
    dataset: Dataset = field(default_factory=Dataset)
    backbone: Backbone = field(default_factory=Backbone)
    pretrain_encoder: PretrainEncoder = field(default_factory=PretrainEncoder)
    augment: Augment = field(default_factory=Augment)
    extract: Extract = field(default_factory=Extract)
    dvae: Dvae = field(default_factory=Dvae)
    model: Model = field(default_factory=Model)
    grouper: Grouper = field(default_factory=Grouper)
    predictor: Predictor = field(default_factory=Predictor)
    decoder: Decoder = field(default_factory=Decoder)
    steve_decoder: SteveDecoder = field(default_factory=SteveDecoder)
    losses: Losses = field(default_factory=Losses)
    optimizer: Optimizer = field(default_factory=Optimizer)
    trainer: Trainer = field(default_factory=Trainer)
    evaluate: Evaluate = field(default_factory=Evaluate)
    inference: Inference = field(default_factory=Inference)


# --------------------------------------------------------------------------------------------
# Aliases: every key that stands for another, in one table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Alias:
    """One way to name a setting other than its own key. ``kind``:

    - ``feeds``: ``key`` (a global of the users' integrated-model docs, or an expression of
      them) is the default of ``target``; writing ``target`` itself wins. pipeline/config.py
      installs ``value`` (``${key}`` unless given) as ``target``'s default when it builds the
      schema: the ``FED`` fields above.
    - ``renamed``: ``key`` is a deprecated name of ``target``; a value written there moves to
      ``target`` when the config is loaded (both in one file must agree).
    - ``foreign``: ``key`` comes from the users' docs and has no place in egoslots' staged
      design; loading it is an error that says ``note``.
    """

    key: str
    target: str | None
    kind: str
    note: str = ""
    value: str | None = None  # feeds: the expression installed (default ``${key}``)

    @property
    def expression(self) -> str:
        return self.value if self.value is not None else "${" + self.key + "}"


ALIASES: tuple[Alias, ...] = (
    # -- the backbone: four keys name it, in this order of precedence: backbone.name, then
    #    globals.BACKBONE, then globals.SILICON_MODEL when globals.USE_SILICON_VIT, else DINOv2.
    Alias(
        "globals.USE_SILICON_VIT, globals.SILICON_MODEL",
        "globals.BACKBONE",
        "feeds",
        "true: the silicon-menagerie ViT globals.SILICON_MODEL; false: DINOv2 ViT-B/14",
        value="${if:${globals.USE_SILICON_VIT},${globals.SILICON_MODEL},vit_base_patch14_dinov2}",
    ),
    Alias("globals.BACKBONE", "backbone.name", "feeds", "the frozen encoder of extract-features"),
    # -- the other globals of the users' docs, each feeding the key a stage reads
    Alias("globals.NUM_SLOTS", "model.num_slots", "feeds"),
    Alias("globals.SLOT_DIM", "model.slot_dim", "feeds"),
    Alias("globals.VOCAB_SIZE", "dvae.vocab_size", "feeds", "the dVAE's codes = STEVE's tokens"),
    Alias("globals.USE_STEVE_DECODER", "steve_decoder.enabled", "feeds"),
    Alias("globals.NUM_FRAMES", "dataset.ep_length", "feeds", "training clip length T"),
    Alias("globals.BATCH_SIZE_PER_GPU", "dataset.batch_size", "feeds", "stage 3, per device"),
    Alias("globals.IMAGE_SIZE", "backbone.input_size", "feeds", "the ViT's input size"),
    Alias("globals.IMAGE_SIZE", "pretrain_encoder.image_size", "feeds", "stage 0's crops"),
    Alias("globals.FRAME_SIZE", "extract.frame_size", "feeds", "cached frames, the dVAE's input"),
    # -- renamed keys: the old name still loads
    Alias(
        "model.initializer.restarts",
        "inference.restarts",
        "renamed",
        "used only when a trained model is applied, so it left the trained model's section "
        "(changing it no longer stops train-slots from resuming)",
    ),
    # -- keys of the integrated model hacked into SlotContrast, whose concept lives elsewhere
    #    (or nowhere) in egoslots' staged design
    Alias(
        "model.loss_weights.loss_dvae_recon",
        None,
        "foreign",
        "loss_dvae_recon is a stage-2 loss in egoslots: the dVAE is pretrained first by "
        "`egoslots pretrain-dvae` and frozen, so it has no weight in the slot model. "
        "Use dvae.* keys (e.g. dvae.lr, dvae.max_steps) to change its training.",
    ),
    Alias(
        "encoder.backbone.frozen",
        None,
        "foreign",
        "the backbone is always frozen in egoslots: its features are computed once by "
        "`egoslots extract-features` and read from the cache. Fine-tuning the ViT is not supported.",
    ),
    Alias(
        "encoder",
        "backbone",
        "foreign",
        "egoslots has no `encoder` section: the frozen ViT is configured under `backbone` "
        "(backbone.name, backbone.checkpoint, backbone.block) and runs only in extract-features.",
    ),
    Alias(
        "globals.NUM_GPUS",
        "trainer.devices",
        "foreign",
        "the number of GPUs is trainer.devices (train-slots) and dvae.devices (pretrain-dvae); "
        "globals.BATCH_SIZE_PER_GPU stays per device, so the global batch grows with the devices.",
    ),
    Alias(
        "dataset.json_dir",
        "dataset.path",
        "foreign",
        "egoslots reads data from dataset.path (see dataset.source for the format).",
    ),
    Alias(
        "dataset.img_dir",
        "dataset.path",
        "foreign",
        "egoslots reads data from dataset.path (see dataset.source for the format).",
    ),
)


def aliases(kind: str) -> tuple[Alias, ...]:
    """The rows of :data:`ALIASES` of one kind."""
    return tuple(a for a in ALIASES if a.kind == kind)


# --------------------------------------------------------------------------------------------
# The limits, read from the fields
# --------------------------------------------------------------------------------------------
def _field_metadata(cls: type, name: str) -> typing.Mapping[str, Any]:
    """A field's metadata; a field redeclared only to change its default (no metadata of its
    own) takes the declaring base class's."""
    for klass in cls.__mro__:
        own = getattr(klass, "__dataclass_fields__", {}).get(name)
        if own is not None and own.metadata:
            return own.metadata
    return {}


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a type hint holds (``X``, ``list[X]``, ``X | None``), or None."""
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    for arg in typing.get_args(hint):
        found = _dataclass_of(arg)
        if found is not None:
            return found
    return None


def schema_fields(cls: type | None = None, prefix: str = "") -> dict[str, typing.Mapping[str, Any]]:
    """{dotted key: field metadata} of every leaf of the schema. The fields of a list of
    dataclasses are named by the list's key (``optimizer.param_groups.lr`` for every group)."""
    cls = Config if cls is None else cls
    hints = typing.get_type_hints(cls)
    out: dict[str, typing.Mapping[str, Any]] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        inner = _dataclass_of(hints[f.name])
        if inner is not None:
            out.update(schema_fields(inner, key))
        else:
            out[key] = _field_metadata(cls, f.name)
    return out


@functools.cache
def schema_limits() -> dict[str, Limit]:
    """{dotted key: Limit} of every key whose values are narrower than its type."""
    return {k: m["limit"] for k, m in schema_fields().items() if m.get("limit") is not None}


# The same table under its old name (read-only: declare a limit beside its field).
LIMITS: typing.Mapping[str, Limit] = schema_limits()
