"""Command line -> TrainConfig -> run_train (``usae train``); also registers ``usae synth``.

Options mirror the fields of :class:`usae.trainer.train.TrainConfig` one to one (a test keeps
them in sync). User errors (bad store, bad checkpoint, non-finite values, full disk) end with
a one-line message and exit code 1, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

import typer
from usae.trainer.train import TrainConfig

_D = TrainConfig()

_UPDATE_HELP = (
    "paper: one optimiser, the summed loss trains encoder i and EVERY decoder (cross-reconstruction "
    "shapes all decoders), one lr schedule. reference: one AdamW per backbone and only the source "
    "backbone's steps (other decoders get no gradient); each backbone's schedule advances only when picked."
)


def register(app: typer.Typer) -> None:
    """Add ``usae train`` (and ``usae synth`` when that module is present) to the CLI."""
    from usae.trainer import synth

    synth.register(app)
    app.command("train")(train_cmd)


def train_cmd(
    store: Path = typer.Option(None, help="Activation store (S.zarr) to train on."),
    out: Path = typer.Option(None, help="New run directory to write."),
    backbones: str = typer.Option("", help="Comma-separated subset of the store's backbones (default: all)."),
    concepts: int = typer.Option(_D.concepts, help="Concepts m (0: 8 x the largest width)."),
    k: int = typer.Option(_D.k, help="Active concepts per token (TopK)."),
    loss: str = typer.Option(_D.loss, help="Reconstruction loss: l1 (mean absolute error) or l2."),
    aux_weight: float = typer.Option(_D.aux_weight, help="Weight of the auxiliary (dead-concept) loss."),
    lr: float = typer.Option(_D.lr, help="Peak AdamW learning rate."),
    lr_min: float = typer.Option(_D.lr_min, help="Learning rate at the end of the cosine decay."),
    weight_decay: float = typer.Option(_D.weight_decay, help="AdamW weight decay."),
    grad_clip: float = typer.Option(_D.grad_clip, help="Global gradient-norm clip (0: off)."),
    batch_tokens: int = typer.Option(_D.batch_tokens, help="Tokens per global batch."),
    steps: int = typer.Option(_D.steps, help="Optimiser steps (0: use --epochs)."),
    epochs: float = typer.Option(_D.epochs, help="Epochs over the training images (when --steps is 0)."),
    warmup_steps: int = typer.Option(_D.warmup_steps, "--warmup-steps", "--warmup",
                                     help="Linear warm-up steps (-1: one epoch)."),
    update: str = typer.Option(_D.update, help=_UPDATE_HELP),
    independent: bool = typer.Option(_D.independent, help="Train one independent SAE per backbone "
                                     "(codes never cross backbones; every step trains all of them)."),
    holdout: float = typer.Option(_D.holdout, help="Fraction of images held out for the final metrics "
                                  "(the store's split when it has one)."),
    seed: int = typer.Option(_D.seed, help="Seed of init, source draws and shuffling."),
    dtype: str = typer.Option(_D.dtype, help="bf16 (autocast matmuls where supported) or fp32."),
    device: str = typer.Option(_D.device, help="auto, cpu or cuda."),
    log_every: int = typer.Option(_D.log_every, help="Steps between metrics.jsonl lines."),
    ckpt_every: int = typer.Option(_D.ckpt_every, help="Steps between checkpoints (0: only at the end)."),
    dead_window_tokens: int = typer.Option(_D.dead_window_tokens,
                                           help="A concept not selected for this many tokens counts as dead."),
    buffer_chunks: int = typer.Option(_D.buffer_chunks, help="Store chunks shuffled together (a batch is drawn "
                                      "from them); 0: 64 for image batches from a raw store, 16 for token batches, "
                                      "4 for a compressed store (decoded into memory)."),
    shuffle: str = typer.Option(_D.shuffle, help="images: batches of whole images in shuffled order (the paper's "
                                "32 x 196 batches), read straight into the batch; tokens: single rows shuffled "
                                "within a buffer of chunks (more images per batch, about half the loader's speed)."),
    resume: Path = typer.Option(None, help="Continue the run in this directory (its config.json wins)."),
    stop_after: int = typer.Option(0, hidden=True, help="Testing aid: stop abruptly after this many steps."),
) -> None:
    """Train a Universal SAE (or independent SAEs) on an activation store; writes a run directory."""
    from usae.pipeline.store import StoreError
    from usae.trainer.checkpoint import CheckpointError
    from usae.trainer.train import SimulatedKill, TrainError, print_metrics, run_train

    try:
        cfg = TrainConfig(
            store=str(store or ""), out=str(out or ""),
            backbones=tuple(b.strip() for b in backbones.split(",") if b.strip()),
            concepts=concepts, k=k, loss=loss, aux_weight=aux_weight, lr=lr, lr_min=lr_min,
            weight_decay=weight_decay, grad_clip=grad_clip, batch_tokens=batch_tokens, steps=steps,
            epochs=epochs, warmup_steps=warmup_steps, update=update, independent=independent,
            holdout=holdout, seed=seed, dtype=dtype, device=device, log_every=log_every,
            ckpt_every=ckpt_every, dead_window_tokens=dead_window_tokens, buffer_chunks=buffer_chunks,
            shuffle=shuffle, resume=str(resume or ""), stop_after=stop_after,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    try:
        res = run_train(cfg)
    except (TrainError, StoreError, CheckpointError, SimulatedKill) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    if res.metrics:
        print_metrics(res.metrics)
        typer.echo(f"run written to {res.run_dir} ({res.steps} steps)")
