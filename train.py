"""Train DiT/SiT (class labels) or MMDiT (text) with representation guidance: SRA (the default), REPA, or
none (the baseline).

    accelerate launch train.py --preset sit-b2-sra --data-dir data/imagenet256-latents
    accelerate launch train.py --preset sit-b2-repa --data-dir data/imagenet256-with-images
    accelerate launch train.py --preset mmdit-coco-sra --data-dir data/coco256

Rerunning the same command resumes from the newest valid checkpoint in the run directory.
"""
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from configs import cli
from errors import UserError, check_output_dir, run_cli
from guidance.registry import METHODS
from preprocessing.dataset import LatentDataset, ResumableSampler, make_loader
from sampling.pipeline import check_compatible, load_decoder
from training.checkpoints import check_loadable, load_latest, own_teacher, restore, save_checkpoint
from training.fid import InTrainingFID, reference_sha256
from training.guard import NonFiniteGuard
from training.metrics import MetricsLogger
from training.parallel import check_strategy
from training.samples import ConditionDraws, grid_inputs, save_sample_grid
from training.setup import (
    build_run,
    carry_identity,
    check_resumable,
    compile_run,
    data_facts,
    reference_identity,
    run_record,
)
from training.step import micro_batches, train_step


def open_dataset(config, accelerator):
    """The dataset, checked against what the run needs and verified by its checksums (the first time;
    a stamp makes later runs skip the hashing). The main process verifies first."""
    if config.run.data_dir is None:
        raise UserError("--data-dir is required (a dataset written by `python -m preprocessing`)")
    needs_images = config.guidance is not None and METHODS[config.method].needs_images
    dataset = LatentDataset(config.run.data_dir, with_images=needs_images)
    with accelerator.main_process_first():
        dataset.verify()
    return dataset


def resume_state(config, run_dir, record, accelerator):
    """(state or None, path). Every mismatch with the saved run is an error here, before anything is
    written; a run whose checkpoints are all unreadable starts over only with --restart."""
    state, path, unreadable = load_latest(run_dir / "checkpoints")
    if state is None and unreadable and not config.run.restart:
        raise UserError(
            f"none of the {len(unreadable)} checkpoints in {run_dir / 'checkpoints'} can be read (newest: "
            f"{unreadable[0][0].name}, {unreadable[0][1]}); rerun with --restart to start over from step 0 "
            "(they are kept), or restore a good copy")
    if state is not None:
        check_loadable(state, path, accelerator)
        saved = reference_identity(state["config"])
        check_resumable(saved, record)
        carry_identity(saved, record)
    return state, path


def main(argv=None):
    args, config = cli.parse(argv, __doc__)
    # Several CPU processes (gloo) only when no GPU is present, e.g. tests and CPU smoke runs.
    accelerator = Accelerator(mixed_precision=config.optim.mixed_precision, cpu=not torch.cuda.is_available())
    device = accelerator.device
    check_strategy(config.optim.parallel, accelerator)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.optim.tf32
        torch.backends.cudnn.allow_tf32 = config.optim.tf32

    # Every check before anything is written: the data, the parts (a frozen encoder loads here), the
    # run directory's checkpoints and their config, the decoder and the FID reference.
    run_dir = Path(config.run.results_dir) / config.run_name
    check_output_dir(run_dir, "--results-dir/--run-name")
    dataset = open_dataset(config, accelerator)
    facts = data_facts(config, dataset, accelerator.num_processes)
    parts = build_run(config, facts, accelerator, dataset)
    draws = ConditionDraws(parts.condition, dataset)
    output = config.output
    identity = parts.guidance.identity() if parts.guidance is not None else {}
    if output.eval_every:  # the FID rows of a run are against one reference, known by content
        identity["eval_ref_statistics_sha256"] = reference_sha256(output.eval_ref)
    record = run_record(config, facts, identity)
    state, state_path = resume_state(config, run_dir, record, accelerator)
    start_step = state["step"] if state is not None else 0
    decoder = eval_fid = None
    if output.sample_every or output.eval_every:
        decoder = load_decoder(output.vae, {"vae": output.vae, "data_dir": config.run.data_dir}, device)
        check_compatible(parts.student.backbone, decoder, None, 1.0)
    if output.eval_every:
        eval_fid = InTrainingFID(output.eval_ref, output.eval_samples, output.eval_batch_size, output.eval_steps,
                                 dataset.meta["sample_shape"], draws, accelerator,
                                 image_size=facts.input_size * decoder.downsample)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"config: {run_dir / 'config.json'} (method {config.method}, {config.model.model}, "
              f"{facts.num_samples} samples, {accelerator.num_processes} process(es))")
    if args.dry_run:
        return {"config": config, "record": record}
    counters = None
    if state is not None:
        restore(state, parts, accelerator)
        counters = state["counters"]
        accelerator.print(f"resumed from {state_path} at step {start_step}")
    del state
    if start_step >= config.optim.max_steps:
        accelerator.print(f"{run_dir} is at step {start_step}, which is not before --max-steps "
                          f"{config.optim.max_steps}: nothing to train (raise --max-steps to continue)")
        return {"config": config, "record": record, "student": parts.student, "ema": parts.ema}
    compile_run(parts, config)
    guard = NonFiniteGuard(config.optim.max_nonfinite_steps, output.log_every, device, start_step, counters)
    train_seconds = (counters or {}).get("train_seconds", 0.0)
    loader = make_loader(
        dataset, facts.per_gpu_batch_size, rank=accelerator.process_index, world_size=accelerator.num_processes,
        seed=config.run.seed, consumed=start_step * facts.per_gpu_batch_size * config.optim.grad_accum_steps,
        num_workers=config.run.num_workers,
    )
    logger = grid_z = grid_y = None
    # A sharded EMA samples only with every process taking part; the main process saves the grid.
    grid_processes = config.optim.parallel == "fsdp" or accelerator.is_main_process
    if accelerator.is_main_process:
        logger = MetricsLogger(run_dir, record, config.run_name, start_step, output.tensorboard, output.wandb)
    if output.sample_every and grid_processes:
        grid_z, grid_y = grid_inputs(output.sample_grid_size, dataset.meta["sample_shape"], draws, device)

    # The loop. Metrics stay on the device between log steps, so the loop never waits on the host.
    window = torch.zeros(3, device=device)
    window_start, window_steps = time.perf_counter(), 0
    progress = tqdm(total=config.optim.max_steps, initial=start_step, disable=not accelerator.is_main_process,
                    dynamic_ncols=True)
    parts.trained.train()
    for step in range(start_step + 1, config.optim.max_steps + 1):
        weight = config.guidance.weight(step - 1, facts.steps_per_epoch) if config.guidance is not None else 0.0
        batches = micro_batches(loader, config.optim.grad_accum_steps)
        totals, grad_norm, finite = train_step(batches, dataset.meta, parts.loss_fn, parts.trained, parts.optimizer,
                                               parts.scaler, accelerator, weight, config.optim.max_grad_norm)
        parts.ema.update(parts.student.backbone, apply=finite)
        if own_teacher(parts):
            parts.teacher.update(parts.student.backbone, apply=finite, decay=config.guidance.teacher_momentum(step - 1))
        guard.record(step, finite)
        window += totals
        window_steps += 1
        progress.update(1)
        last = step == config.optim.max_steps
        if guard.due() or last:
            stop_if_nonfinite(guard.check(), config, facts, accelerator, run_dir)

        if step % output.log_every == 0 or last:
            seconds = time.perf_counter() - window_start
            train_seconds += seconds
            values = log_window(window / window_steps, grad_norm, guard, window_steps, seconds, train_seconds,
                                config, accelerator, weight)
            postfix = {"loss": f"{values['loss']:.4f}", "img_s": f"{values['img_per_s']:.1f}"}
            if config.guidance is not None:
                postfix["align"] = f"{values['align']:.4f}"
            progress.set_postfix(postfix)
            if logger is not None:
                logger.log(step, values)
            window.zero_()
            window_steps = 0
        side_start = time.perf_counter()  # checkpoints, grids and FID do not count as training time
        if step % output.ckpt_every == 0 or last:
            counters = {**guard.counters(), "train_seconds": train_seconds}
            save_checkpoint(run_dir, step, record, parts, counters, accelerator)
        if output.sample_every and (step % output.sample_every == 0 or last):
            if grid_processes:
                path = run_dir / f"samples_{step:07d}.png" if accelerator.is_main_process else None
                save_sample_grid(parts.ema.model, parts.objective, decoder.decode, grid_z, grid_y, path,
                                 output.sample_steps)
            accelerator.wait_for_everyone()
        if eval_fid is not None and (step % output.eval_every == 0 or last):
            value = eval_fid(parts.ema.model, parts.objective, decoder.decode)
            if logger is not None:
                logger.log(step, {f"fid{output.eval_samples}": value, "train_time_s": train_seconds})
                progress.write(f"step {step}: FID-{output.eval_samples} {value:.2f}")
        if window_steps == 0:
            window_start = time.perf_counter()
        else:
            window_start += time.perf_counter() - side_start
    progress.close()
    if logger is not None:
        logger.close()
    accelerator.end_training()
    return {"config": config, "record": record, "student": parts.student, "ema": parts.ema}


def stop_if_nonfinite(streak, config, facts, accelerator, run_dir):
    """Stop the run, naming the steps and this process's samples in them, once a streak of skipped
    steps reached --max-nonfinite-steps."""
    if streak is None:
        return
    length, steps = streak
    per_step = facts.per_gpu_batch_size * config.optim.grad_accum_steps
    sampler = ResumableSampler(facts.num_samples, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, seed=config.run.seed)
    shown = []
    for step in steps[-4:]:
        epoch_pos = sampler.state((step - 1) * per_step)
        indices = sampler.epoch_indices(epoch_pos["epoch"])[epoch_pos["position"]:][:per_step].tolist()
        shown.append(f"step {step}: {indices[:8]}{' …' if len(indices) > 8 else ''}")
    raise RuntimeError(
        f"{length} consecutive steps had non-finite gradients (steps {steps[0]}–{steps[-1]}, "
        f"--max-nonfinite-steps {config.optim.max_nonfinite_steps}); each was skipped, so the weights are those "
        f"before step {steps[0]}. Dataset indices of process {accelerator.process_index} in the last of them: "
        f"{'; '.join(shown)}. The checkpoints in {run_dir / 'checkpoints'} are intact.")


def log_window(means, grad_norm, guard, steps, seconds, train_seconds, config, accelerator, weight):
    """Average the window's loss terms over processes and read them to the host (one sync)."""
    means = accelerator.reduce(means, reduction="mean")
    loss, gen, align = means.tolist()
    values = {"loss": loss, "gen_loss": gen}
    if config.guidance is not None:
        values.update(align=align, align_weight=weight)
    values.update({
        "grad_norm": float(grad_norm), "nonfinite_total": float(guard.total),
        "nonfinite_run": float(guard.run), "step_time_s": seconds / steps,
        "img_per_s": steps * config.optim.global_batch_size / seconds, "train_time_s": train_seconds,
    })
    if accelerator.device.type == "cuda":
        values["peak_mem_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    return values


if __name__ == "__main__":
    run_cli(main)
