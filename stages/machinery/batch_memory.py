"""Upper bounds on the memory-sizing options, checked against the memory available before any
work: ``extract.batch_size`` and ``extract.frames_per_chunk`` (extract-features),
``dvae.batch_size`` (pretrain-dvae), ``dvae.tokenize_batch_size`` / ``tokenize --batch-size``
and ``dataset.batch_size`` (``globals.BATCH_SIZE_PER_GPU``, train-slots).

The schema only bounds these keys by 2^20; a value inside that range can still ask for
hundreds of GB, which failed deep inside torch (or swapped the machine) after minutes of work.
Each estimate here is a *lower* bound of what one item costs, in float32: the tensors the stage
must hold at once (inputs, outputs, the widest activations torch keeps for the backward pass),
never the model's own workspace. So a refused value would certainly not have fitted, and a value
that passes may still be too large for a big backbone; the line names the key, the estimate and
the largest value that fits. Batches that never exceed a chunk (extraction, tokenization) are
sized at ``min(batch, chunk)``: a large batch over small chunks costs nothing extra.
"""

from __future__ import annotations

from omegaconf import DictConfig

from egoslots.stages.machinery.common import check_fits_in_memory, check_key_fits_in_memory

FLOAT = 4  # bytes of a float32


def extraction_bytes(input_size: int, frame_size: int, num_tokens: int, feature_dim: int):
    """(bytes per frame of a chunk held in memory, bytes per frame of a backbone batch).

    A chunk holds its decoded images (uint8 at the backbone's input size), its cached frames and
    masks (uint8) and its features (float32, then the storage copy); a batch holds the float
    input and the backbone's output tokens (and their residual)."""
    per_chunk = 3 * input_size**2 + 4 * frame_size**2 + 2 * FLOAT * num_tokens * feature_dim
    per_batch = FLOAT * (3 * input_size**2 + 2 * num_tokens * feature_dim)
    return per_chunk, per_batch


def dvae_train_bytes(frame_size: int, hidden: int, vocab: int) -> int:
    """Bytes one frame of a dVAE training batch keeps for the backward pass: the frame and its
    reconstruction, the encoder's seven blocks and the decoder's at the token grid (hidden
    channels), the vocabulary logits, log-probabilities, Gumbel sample and softmax, and the
    decoder's two upsampled stages (4 x hidden channels before each pixel shuffle)."""
    grid = (frame_size // 4) ** 2
    return FLOAT * (
        2 * 3 * frame_size**2
        + 7 * hidden * grid
        + 4 * vocab * grid
        + 8 * hidden * grid  # decoder at the grid: 3 blocks + the 4c block
        + 8 * hidden * 4 * grid  # decoder at 2x: 3 blocks + the 4c block
        + hidden * 16 * grid  # decoder at full size
    )


def tokenize_bytes(frame_size: int, hidden: int, vocab: int) -> int:
    """Bytes one frame of a tokenize batch needs (no gradients): the frame, one hidden map and
    the vocabulary logits at the token grid."""
    grid = (frame_size // 4) ** 2
    return FLOAT * (3 * frame_size**2 + (hidden + vocab) * grid)


def clip_bytes(frames: int, tokens: int, dim: int, slots: int, widest: int) -> int:
    """Bytes one clip of ``frames`` frames costs the slot model: the features, their
    reconstruction and error, and the MLP decoder's two widest activations over every slot and
    token (what one gaussian restart draw costs at inference, ``run_options.restart_bytes``)."""
    return FLOAT * frames * tokens * (slots * 2 * (widest + dim + 1) + 3 * dim)


def check_extraction(cfg: DictConfig, backbone, on_gpu: bool, frames: int | None = None) -> None:
    """``extract.frames_per_chunk`` and ``extract.batch_size`` against the memory (the chunk:
    the host's; the batch: the extraction device's). The backbone gives its input size, tokens
    and feature width; no chunk holds more than the store's ``frames``."""
    e = cfg.extract
    per_chunk, per_batch = extraction_bytes(
        int(backbone.input_size), int(e.frame_size), int(backbone.num_tokens),
        int(backbone.feature_dim),
    )  # fmt: skip
    chunk = min(int(e.frames_per_chunk), frames or int(e.frames_per_chunk))
    check_key_fits_in_memory(
        "extract.frames_per_chunk", int(e.frames_per_chunk), per_chunk, "frames",
        "one chunk's images, frames and features, held in host memory", gpu=False, count=chunk,
    )  # fmt: skip
    check_key_fits_in_memory(
        "extract.batch_size", int(e.batch_size), per_batch, "frames",
        f"input and output of the backbone at {int(backbone.input_size)} px; a batch never "
        "exceeds extract.frames_per_chunk", gpu=on_gpu, count=min(int(e.batch_size), chunk),
    )  # fmt: skip


def check_dvae_batch(cfg: DictConfig, frame_size: int, on_gpu: bool) -> None:
    """``dvae.batch_size`` against the memory of the device pretrain-dvae trains on."""
    d = cfg.dvae
    per_frame = dvae_train_bytes(frame_size, int(d.hidden), int(d.vocab_size))
    check_key_fits_in_memory(
        "dvae.batch_size", int(d.batch_size), per_frame, "frames",
        f"the dVAE's activations at {frame_size} px, vocabulary {int(d.vocab_size)}", gpu=on_gpu,
    )  # fmt: skip


def check_tokenize_batch(
    batch: int, chunk_len: int, frame_size: int, hidden: int, vocab: int, on_gpu: bool,
    option: str | None,
) -> None:  # fmt: skip
    """``tokenize --batch-size`` (``option``) or ``dvae.tokenize_batch_size`` (option None)
    against the memory of the tokenizing device; a batch never exceeds one store chunk."""
    per_frame = tokenize_bytes(frame_size, hidden, vocab)
    effective = min(batch, chunk_len)
    note = f"the dVAE encoder at {frame_size} px, vocabulary {vocab}; the store's chunks hold {chunk_len} frames"
    if option is not None:
        check_fits_in_memory(option, effective, per_frame, "frames", note)
    else:
        check_key_fits_in_memory(
            "dvae.tokenize_batch_size", batch, per_frame, "frames", note, gpu=on_gpu,
            count=effective,
        )  # fmt: skip


def check_slot_batch(cfg: DictConfig, meta: dict, on_gpu: bool) -> None:
    """``dataset.batch_size`` (``globals.BATCH_SIZE_PER_GPU``) against the memory of the
    device train-slots trains on: clips of ``dataset.ep_length`` frames of the store's tokens."""
    frames, slots = int(cfg.dataset.ep_length), int(cfg.model.num_slots)
    widest = max([int(h) for h in cfg.decoder.hidden_dims] + [int(cfg.model.slot_dim)])
    per_clip = clip_bytes(frames, int(meta["num_tokens"]), int(meta["feature_dim"]), slots, widest)
    check_key_fits_in_memory(
        "dataset.batch_size", int(cfg.dataset.batch_size), per_clip, "clips",
        f"{frames}-frame clips through {slots} slots; globals.BATCH_SIZE_PER_GPU sets it",
        gpu=on_gpu,
    )  # fmt: skip
