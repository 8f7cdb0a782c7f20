"""The typed schema of every egoslots config: names, types and defaults.

Defaults follow the users' integrated-model docs (7 slots x 128, vocab 4096, dVAE and STEVE
decoder on) and the published SlotContrast / STEVE settings in ``shared/reference.md``.
Section names keep the ones users already know (``globals``, ``dataset``, ``grouper``,
``model.loss_weights``, ``losses.loss_ss``, ``optimizer``, ``trainer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# dvae.arch: whose conv block the dVAE's hidden layers use (see pipeline/dvae.py).
DVAE_ARCHS = ("steve", "slate")
# decoder.mixing: what mixes the per-slot reconstructions (see pipeline/decoders.py).
DECODER_MIXINGS = ("alpha", "attention")


@dataclass
class Globals:
    NUM_SLOTS: int = 7
    SLOT_DIM: int = 128
    VOCAB_SIZE: int = 4096
    USE_SILICON_VIT: bool = True
    SILICON_MODEL: str = "dino_say_vitb14"
    # The frozen encoder; by default a silicon-menagerie ViT or DINOv2 per USE_SILICON_VIT.
    BACKBONE: str = (
        "${if:${globals.USE_SILICON_VIT},${globals.SILICON_MODEL},vit_base_patch14_dinov2}"
    )
    USE_DVAE: bool = True
    USE_STEVE_DECODER: bool = True
    NUM_FRAMES: int = 4  # training clip length T
    BATCH_SIZE_PER_GPU: int = 16
    IMAGE_SIZE: int = 224  # ViT input size
    FRAME_SIZE: int = 128  # cached frame size (dVAE input; token grid = FRAME_SIZE / 4)


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
    image_key: str = "image"
    mask_key: str | None = "mask"
    # Leading axes of the image array: "video" = (V, T, H, W, C); "image" = (N, H, W, C), each
    # image a one-frame video.
    layout: str = "video"


@dataclass
class WebdatasetShards:
    # Tar shards as SlotContrast's data/save_movi.py and save_ytvis2021.py write them: members
    # <key>.video.npy (T, H, W, 3) uint8 and <key>.segmentations.npy (T, H, W, 1) label maps
    # (MOVi) or (T, H, W, I) one channel per instance (YT-VIS). Brace patterns as in
    # SlotContrast's configs ("movi_c/movi_c-train-{000000..000304}.tar"), relative to
    # dataset.path (a folder or an fsspec URL) unless absolute. The pattern gives the split.
    train_shards: str | None = None
    val_shards: str | None = None
    test_shards: str | None = None
    video_key: str = "video"  # member <key>.<video_key>.npy
    mask_key: str | None = "segmentations"  # null: no masks (SlotContrast's --only-video shards)


@dataclass
class SplitFractions:
    val: float = 0.1
    test: float = 0.1


@dataclass
class Dataset:
    source: str = "synthetic"  # frames | video | hdf5 | webdataset | synthetic
    path: str = "${work_dir}/data/synthetic"
    fps: float | None = None  # video files: subsample to this frame rate
    hdf5: Hdf5Keys = field(default_factory=Hdf5Keys)
    webdataset: WebdatasetShards = field(default_factory=WebdatasetShards)
    split: SplitFractions = field(default_factory=SplitFractions)
    synthetic: SyntheticData = field(default_factory=SyntheticData)
    max_videos: int | None = None
    skip_bad: bool = False
    # Clips for training: length T, stride between clip starts, frame step within a clip.
    ep_length: int = "${globals.NUM_FRAMES}"  # type: ignore[assignment]
    clip_stride: int = 1
    frame_step: int = 1
    batch_size: int = "${globals.BATCH_SIZE_PER_GPU}"  # type: ignore[assignment]
    # 0: read ahead in a thread of the training process (fastest from a local store: a batch is
    # a few preadv calls); N > 0: N worker processes (a remote store, where each clip is a request).
    num_workers: int = 0


@dataclass
class Backbone:
    name: str = "${globals.BACKBONE}"
    # local .pth; else $EGOSLOTS_WEIGHTS/<name>.pth; else fetched by name into the Hugging Face
    # cache (eminorhan/<name>, timm's hub id) unless HF_HUB_OFFLINE=1
    checkpoint: str | None = None
    block: int | None = (
        None  # block whose output is the feature: 0-based (timm blocks.N), <0 from the end; None = last
    )
    final_norm: bool = False
    input_size: int = "${globals.IMAGE_SIZE}"  # type: ignore[assignment]
    patch_size: int | None = None  # patch-pixels only (ViTs know their own)
    proj_dim: int | None = None  # patch-pixels: fixed random projection to this dim
    mean: list[float] | None = None  # default: ImageNet, unless the backbone says otherwise
    std: list[float] | None = None
    # name=self: the pretrain-encoder run whose encoder.pth to load; None = this config's run,
    # <work_dir>/runs/<pretrain_encoder.run_name> (filled in when the config is loaded).
    encoder_run: str | None = None


@dataclass
class Augment:
    hflip: str = "none"  # none | cache


@dataclass
class Extract:
    batch_size: int = 16
    num_workers: int = 2
    dtype: str = "float16"  # storage dtype: float16 | bfloat16 | int8 | float32
    compute: str = "auto"  # auto | fp32 | bf16
    device: str = "auto"
    frame_size: int = "${globals.FRAME_SIZE}"  # type: ignore[assignment]
    # Unit of work, resume and sharding: one zarr shard file per array per chunk.
    frames_per_chunk: int = 64
    # Frames per inner (read) chunk inside a shard: a random clip reads only the inner chunks
    # it covers. Should divide frames_per_chunk (else the largest divisor below it is used).
    inner_chunk: int = 1
    compressor: str = "none"  # none | zstd | blosc (lz4 + byte shuffle); see docs/store-format.md


@dataclass
class Geco:
    # GECO (EfficientMORL) for the dVAE: a multiplier softplus(beta) on reconstruction that rises
    # while the error is above `target` and falls below it; balances dvae.kl_weight's prior term.
    enabled: bool = False
    target: float = 0.01  # target reconstruction error (per pixel MSE)
    eta: float = 1.0e-6  # step size of beta per unit of (summed per-frame) constraint
    ema: float = 0.99
    warmup_steps: int = 1000  # beta stays at beta_init for this many steps
    beta_init: float = 1.0
    beta_min: float = 0.55


@dataclass
class Dvae:
    run_name: str = "dvae"
    vocab_size: int = "${globals.VOCAB_SIZE}"  # type: ignore[assignment]
    hidden: int = 64
    # steve: STEVE's conv blocks (conv with bias -> ReLU); slate: SLATE's (conv -> GroupNorm ->
    # ReLU), what egoslots used before this key existed. Part of the dVAE's identity.
    arch: str = "steve"
    lr: float = 3.0e-4
    batch_size: int = 32
    max_steps: int = 30000
    tau_start: float = 1.0
    tau_final: float = 0.1
    tau_steps: int = 30000
    kl_weight: float = 0.0  # optional KL to a uniform prior over codes
    geco: Geco = field(default_factory=Geco)
    ckpt_every: int = 1000
    log_every: int = 50
    image_every: int = 1000
    num_workers: int = 0  # as dataset.num_workers: 0 = a read-ahead thread, N = N processes
    tokenize_batch_size: int = 64
    tokenize_device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    accelerator: str = "auto"  # Lightning accelerator for pretraining: auto | cpu | gpu
    # auto: the faster of 32 and bf16-mixed by a probe of this step (stages/machinery/runtime.py) | 32 | bf16-mixed
    precision: str = "auto"
    # Multi-GPU / multi-node pretraining (Lightning DDP, as trainer.* for stage 3): batch_size is
    # per device, the global batch is batch_size x devices x num_nodes. Tokenization runs on rank 0.
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"


@dataclass
class PretrainEncoder:
    """Stage 0, `egoslots pretrain-encoder`: DINO self-distillation of a ViT on the dataset's own
    train frames (silicon-menagerie's recipe). Defaults are DINO's (facebookresearch/dino
    main_dino.py, ViT-S/16 at 224 px); DINO's epoch counts are steps here. `backbone.name: self`
    extracts features with the result; `egoslots run` trains it first."""

    run_name: str = "encoder"
    # The ViT (DINO's vision_transformer.py shape; vit_tiny 192/12/3, vit_small 384/12/6,
    # vit_base 768/12/12).
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1  # stochastic depth of the student
    # Global crop size: frames are cached at this size (shorter side + centre crop, as stage 1).
    image_size: int = "${globals.IMAGE_SIZE}"  # type: ignore[assignment]
    frame_step: int = 1  # train on every k-th frame of each train video (neighbours look alike)
    # Projection head (DINOHead): 3-layer MLP, l2-normalised bottleneck, weight-normed last layer.
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    # Multi-crop: 2 global crops (image_size) + num_local_crops local crops (local_size).
    # crops: batched = the whole batch at once in torch on the training device (3x faster on a
    # CPU, see docs/benchmarks.md); lightly = DINO's PIL pipeline per image in DataLoader workers.
    crops: str = "batched"
    num_local_crops: int = 8
    local_size: int = 96
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    hflip: float = 0.5
    color_jitter: float = 0.8  # probability; strength DINO's (0.4, 0.4, 0.2, 0.1)
    color_strength: float = 1.0  # multiplies DINO's jitter strengths (0 = no jitter)
    grayscale: float = 0.2
    blur: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])  # global 1, global 2, local
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # px, at 224 px crops
    solarize: float = 0.2  # second global crop only
    # Loss: centering and sharpening.
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996  # EMA, cosine to 1 over max_steps
    # Optimisation: AdamW, lr = lr * global batch / 256 after warm-up, cosine to min_lr.
    batch_size: int = 64  # per device
    max_steps: int = 100000
    lr: float = 5.0e-4
    min_lr: float = 1.0e-6
    warmup_steps: int = 10000
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # per-parameter gradient norm (0 = off)
    freeze_last_layer_steps: int = 1000
    # Machinery, as dvae.*.
    ckpt_every: int = 1000
    log_every: int = 50
    image_every: int = 1000  # teacher attention maps in TensorBoard (0 = never)
    num_workers: int = 2
    accelerator: str = "auto"
    # auto: the faster of 32 and bf16-mixed by a probe of this step (stages/machinery/runtime.py) | 32 | bf16-mixed
    precision: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"


@dataclass
class Initializer:
    name: str = "fixed"  # fixed (SlotContrast) | gaussian (VideoSAUR/STEVE)
    # evaluate / export-slots / visualize with a gaussian initializer: draws of each video's first
    # slots; the draw whose slots reconstruct the first window's features best is kept, as k-means
    # keeps the best of n_init runs (1: one draw, the published behaviour; docs/discovery.md)
    restarts: int = 1


@dataclass
class LossWeights:
    loss_featrec: float = 1.0
    loss_ss: float = 0.5
    loss_steve_ce: float = 1.0


@dataclass
class Model:
    num_slots: int = "${globals.NUM_SLOTS}"  # type: ignore[assignment]
    slot_dim: int = "${globals.SLOT_DIM}"  # type: ignore[assignment]
    initializer: Initializer = field(default_factory=Initializer)
    loss_weights: LossWeights = field(default_factory=LossWeights)


@dataclass
class Grouper:
    n_iters: int = 2  # slot-attention iterations on frames after the first
    n_iters_first: int = 3
    eps: float = 1.0e-8
    mlp_ratio: int = 4


@dataclass
class Predictor:
    enabled: bool = True
    num_heads: int = 4
    ffn_ratio: int = 4
    # "published": SlotContrast's code scales attention logits by sqrt(head_dim) (q / head_dim**-0.5);
    # "standard": the usual 1/sqrt(head_dim). See pipeline/predictor.py.
    attn_scale: str = "published"


@dataclass
class Decoder:
    hidden_dims: list[int] = field(default_factory=lambda: [1024, 1024, 1024])
    # How the per-slot reconstructions are mixed: "alpha" (SlotContrast: the decoder's own alpha
    # channel, softmax over slots) or "attention" (the slot-attention masks; an egoslots option
    # that discovers objects much sooner at small scale, see docs/discovery.md).
    mixing: str = "alpha"


@dataclass
class SteveDecoder:
    enabled: bool = "${globals.USE_STEVE_DECODER}"  # type: ignore[assignment]
    num_blocks: int = 8
    num_heads: int = 4
    d_model: int = 192
    dropout: float = 0.1
    # true: the decoder's cross-entropy trains the decoder only, not the slots (STEVE's gradient
    # reaches slot attention: false). The slots are then shaped by SlotContrast's losses alone.
    detach_slots: bool = False


@dataclass
class LossSS:
    temperature: float = 0.1
    batch_contrast: bool = True
    all_gather: bool = False  # DDP: contrast against the global batch


@dataclass
class Losses:
    loss_ss: LossSS = field(default_factory=LossSS)


@dataclass
class ParamGroup:
    regex: str = ".*"
    lr: float = 4.0e-4


@dataclass
class Optimizer:
    lr: float = 4.0e-4
    warmup_steps: int = 2500
    decay: bool = True  # decay_final ** ((step - warmup) / (max_steps - warmup)) after warmup
    # the lr factor the decay reaches at trainer.max_steps: 0.5 is SlotContrast's; a short run
    # ends on a settled model with a smaller one (the demo: 0.02)
    decay_final: float = 0.5
    param_groups: list[ParamGroup] = field(default_factory=list)


@dataclass
class Trainer:
    max_steps: int = 100000
    gradient_clip_val: float = 0.05
    # auto: the faster of 32 and bf16-mixed by a probe of this step (stages/machinery/runtime.py) | 32 | bf16-mixed
    precision: str = "auto"
    tf32: bool = True
    compile: bool = False
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    ckpt_every: int = 2500
    val_every: int = 2500
    val_batches: int = 50  # stage 3: validation batches per check (0 = no validation)
    log_every: int = 50
    image_every: int = 5000


@dataclass
class Evaluate:
    split: str = "test"
    probe: bool = True  # property probe (needs per-object attributes, e.g. synthetic meta.json)
    max_videos: int | None = None  # evaluate only the first N videos of the split
    probe_train_videos: int | None = 200  # train videos the probe is fit on (None = all)
    # also score masks refined from the token grid to pixels with the video's colours
    # (pipeline/refine.py), beside the raw masks; needs the store's frames
    refine: bool = True


@dataclass
class Config:
    work_dir: str = "./egoslots-work"
    run_name: str = "slots"
    seed: int = 0
    # Feature store that later stages read: a path, or a fingerprint under work_dir/stores.
    # None: the one complete store in work_dir that matches this config's extraction settings.
    store: str | None = None
    # Folder where extraction creates stores and later stages look for them: a local path or an
    # fsspec URL (s3://bucket/prefix, gs://..., file://...). None = work_dir/stores. Credentials
    # and endpoints come from the environment, never from configs (see docs/scaling.md).
    store_dir: str | None = None
    # dVAE run whose tokens stage 3 reads: a run directory; None = work_dir/runs/<dvae.run_name>.
    dvae_run: str | None = None
    # torch intra-op threads; 0 = EGOSLOTS_NUM_THREADS if set, else the CPUs this process may
    # use (affinity mask, cgroup CPU quota) less extraction's decode workers (stages/machinery/runtime.py).
    num_threads: int = 0
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


# --------------------------------------------------------------------------------------------
# What values each key accepts, beyond its type: the one place config values are range-checked
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
WORKERS = at_least(0, 256)
# Whole-model half precision (16-true, bf16-true) is not among them: the models keep fp32 parts.
PRECISIONS = one_of("auto", "32", "32-true", "fp32", "bf16", "bf16-mixed", "16-mixed")
ACCELERATORS = one_of("auto", "cpu", "gpu", "cuda")
FRACTION = at_least(0, 1)

# Every key whose values are narrower than its type. tests/test_config_limits.py checks that
# every numeric, list and path key of the schema is here, and tries 0, -1, nan and huge values.
LIMITS: dict[str, Limit] = {
    "work_dir": Limit(kind="folder"),
    "run_name": Limit(kind="name"),
    "seed": at_least(0, 2**32 - 1),
    "num_threads": at_least(0, 4096),
    "store": Limit(kind="path"),
    "store_dir": Limit(kind="path"),
    "dvae_run": Limit(kind="folder"),
    "globals.NUM_SLOTS": at_least(1, 1024),
    "globals.SLOT_DIM": at_least(1, 65536),
    "globals.VOCAB_SIZE": at_least(2, 65536),
    "globals.NUM_FRAMES": at_least(1, 100000),
    "globals.BATCH_SIZE_PER_GPU": at_least(1, 1 << 20),
    "globals.IMAGE_SIZE": at_least(1, 8192),
    "globals.FRAME_SIZE": at_least(4, 8192),
    "dataset.source": one_of("frames", "video", "hdf5", "webdataset", "synthetic"),
    "dataset.path": Limit(kind="path"),
    "dataset.fps": above(0, 1000),
    "dataset.hdf5.layout": one_of("video", "image"),
    "dataset.split.val": FRACTION,
    "dataset.split.test": FRACTION,
    "dataset.synthetic.videos": at_least(1, 1 << 20),
    "dataset.synthetic.frames": at_least(1, 1 << 20),
    "dataset.synthetic.size": at_least(8, 4096),
    "dataset.synthetic.seed": at_least(0, 2**31 - 1),
    "dataset.synthetic.min_objects": at_least(1, 64),
    "dataset.synthetic.max_objects": at_least(1, 64),
    "dataset.synthetic.fps": above(0, 1000),
    "dataset.synthetic.scene": one_of("tabletop", "room", "clutter"),
    "dataset.max_videos": COUNT,
    "dataset.ep_length": at_least(1, 100000),
    "dataset.clip_stride": at_least(1, 100000),
    "dataset.frame_step": at_least(1, 100000),
    "dataset.batch_size": at_least(1, 1 << 20),
    "dataset.num_workers": WORKERS,
    "backbone.checkpoint": Limit(kind="path"),
    "backbone.encoder_run": Limit(kind="folder"),
    "backbone.block": at_least(-1000, 1000),
    "backbone.input_size": at_least(1, 8192),
    "backbone.patch_size": at_least(1, 8192),
    "backbone.proj_dim": at_least(1, 65536),
    "backbone.mean": at_least(-1000, 1000),
    "backbone.std": above(0, 1000),
    "augment.hflip": one_of("none", "cache"),
    "extract.batch_size": at_least(1, 1 << 20),
    "extract.num_workers": WORKERS,
    "extract.dtype": one_of("float16", "bfloat16", "int8", "float32"),
    "extract.compute": one_of("auto", "fp32", "bf16"),
    "extract.device": Limit(kind="device"),
    "extract.frame_size": at_least(4, 8192),
    "extract.frames_per_chunk": at_least(1, 1 << 20),
    "extract.inner_chunk": at_least(1, 1 << 20),
    "extract.compressor": one_of("none", "zstd", "blosc"),
    "dvae.run_name": Limit(kind="name"),
    "dvae.vocab_size": at_least(2, 65536),
    "dvae.hidden": at_least(1, 4096),
    "dvae.arch": one_of(*DVAE_ARCHS),
    "dvae.lr": above(0, 10),
    "dvae.batch_size": at_least(1, 1 << 20),
    "dvae.max_steps": at_least(1, 10**9),
    "dvae.tau_start": above(0, 1000),
    "dvae.tau_final": above(0, 1000),
    "dvae.tau_steps": at_least(1, 10**9),
    "dvae.kl_weight": at_least(0, 1e6),
    "dvae.geco.target": above(0, 1e6),
    "dvae.geco.eta": at_least(0, 1e6),
    "dvae.geco.ema": Limit(low=0, high=1, high_open=True),
    "dvae.geco.warmup_steps": at_least(0, 10**9),
    "dvae.geco.beta_init": above(0, 1e6),
    "dvae.geco.beta_min": above(0, 1e6),
    "dvae.ckpt_every": at_least(1, 10**9),
    "dvae.log_every": at_least(1, 10**9),
    "dvae.image_every": at_least(1, 10**9),
    "dvae.num_workers": WORKERS,
    "dvae.tokenize_batch_size": at_least(1, 1 << 20),
    "dvae.tokenize_device": Limit(kind="device"),
    "dvae.accelerator": ACCELERATORS,
    "dvae.precision": PRECISIONS,
    "dvae.devices": Limit(kind="devices"),
    "dvae.num_nodes": at_least(1, 100000),
    "model.num_slots": at_least(1, 1024),
    "model.slot_dim": at_least(1, 65536),
    "model.initializer.name": one_of("fixed", "gaussian"),
    "model.initializer.restarts": at_least(1, 4096),
    "model.loss_weights.loss_featrec": at_least(0, 1e6),
    "model.loss_weights.loss_ss": at_least(0, 1e6),
    "model.loss_weights.loss_steve_ce": at_least(0, 1e6),
    "grouper.n_iters": at_least(1, 100),
    "grouper.n_iters_first": at_least(1, 100),
    "grouper.eps": above(0, 1),
    "grouper.mlp_ratio": at_least(1, 64),
    "predictor.num_heads": at_least(1, 1024),
    "predictor.ffn_ratio": at_least(1, 64),
    "predictor.attn_scale": one_of("published", "standard"),
    "decoder.hidden_dims": at_least(1, 65536),
    "decoder.mixing": one_of(*DECODER_MIXINGS),
    "steve_decoder.num_blocks": at_least(1, 256),
    "steve_decoder.num_heads": at_least(1, 1024),
    "steve_decoder.d_model": at_least(1, 65536),
    "steve_decoder.dropout": Limit(low=0, high=1, high_open=True),
    "losses.loss_ss.temperature": above(0, 1e6),
    "optimizer.lr": above(0, 10),
    "optimizer.param_groups.lr": above(0, 10),  # every group's lr
    "optimizer.warmup_steps": at_least(0, 10**9),
    "optimizer.decay_final": above(0, 1),
    "trainer.max_steps": at_least(1, 10**9),
    "trainer.gradient_clip_val": at_least(0, 1e6),
    "trainer.precision": PRECISIONS,
    "trainer.accelerator": ACCELERATORS,
    "trainer.devices": Limit(kind="devices"),
    "trainer.num_nodes": at_least(1, 100000),
    "trainer.ckpt_every": at_least(1, 10**9),
    "trainer.val_every": at_least(1, 10**9),
    "trainer.val_batches": at_least(0, 10**9),
    "trainer.log_every": at_least(1, 10**9),
    "trainer.image_every": at_least(1, 10**9),
    "pretrain_encoder.run_name": Limit(kind="name"),
    "pretrain_encoder.patch_size": at_least(1, 1024),
    "pretrain_encoder.embed_dim": at_least(1, 65536),
    "pretrain_encoder.depth": at_least(1, 256),
    "pretrain_encoder.num_heads": at_least(1, 1024),
    "pretrain_encoder.mlp_ratio": above(0, 64),
    "pretrain_encoder.drop_path_rate": Limit(low=0, high=1, high_open=True),
    "pretrain_encoder.image_size": at_least(1, 8192),
    "pretrain_encoder.frame_step": at_least(1, 100000),
    "pretrain_encoder.out_dim": at_least(1, 1 << 20),
    "pretrain_encoder.hidden_dim": at_least(1, 65536),
    "pretrain_encoder.bottleneck_dim": at_least(1, 65536),
    "pretrain_encoder.crops": one_of("batched", "lightly"),
    "pretrain_encoder.num_local_crops": at_least(0, 64),
    "pretrain_encoder.local_size": at_least(1, 8192),
    "pretrain_encoder.global_scale": above(0, 1),
    "pretrain_encoder.local_scale": above(0, 1),
    "pretrain_encoder.hflip": FRACTION,
    "pretrain_encoder.color_jitter": FRACTION,
    "pretrain_encoder.color_strength": at_least(0, 100),
    "pretrain_encoder.grayscale": FRACTION,
    "pretrain_encoder.blur": FRACTION,
    "pretrain_encoder.blur_sigma": above(0, 1000),
    "pretrain_encoder.solarize": FRACTION,
    "pretrain_encoder.student_temp": above(0, 100),
    "pretrain_encoder.teacher_temp": above(0, 100),
    "pretrain_encoder.warmup_teacher_temp": above(0, 100),
    "pretrain_encoder.warmup_teacher_temp_steps": at_least(0, 10**9),
    "pretrain_encoder.center_momentum": FRACTION,
    "pretrain_encoder.momentum_teacher": FRACTION,
    "pretrain_encoder.batch_size": at_least(1, 1 << 20),
    "pretrain_encoder.max_steps": at_least(1, 10**9),
    "pretrain_encoder.lr": above(0, 10),
    "pretrain_encoder.min_lr": at_least(0, 10),
    "pretrain_encoder.warmup_steps": at_least(0, 10**9),
    "pretrain_encoder.weight_decay": at_least(0, 100),
    "pretrain_encoder.weight_decay_end": at_least(0, 100),
    "pretrain_encoder.clip_grad": at_least(0, 1e6),
    "pretrain_encoder.freeze_last_layer_steps": at_least(0, 10**9),
    "pretrain_encoder.ckpt_every": at_least(1, 10**9),
    "pretrain_encoder.log_every": at_least(1, 10**9),
    "pretrain_encoder.image_every": at_least(0, 10**9),  # 0 = never
    "pretrain_encoder.num_workers": WORKERS,
    "pretrain_encoder.accelerator": ACCELERATORS,
    "pretrain_encoder.precision": PRECISIONS,
    "pretrain_encoder.devices": Limit(kind="devices"),
    "pretrain_encoder.num_nodes": at_least(1, 100000),
    "evaluate.split": one_of("train", "val", "test"),
    "evaluate.max_videos": COUNT,
    "evaluate.probe_train_videos": COUNT,
}
