"""Where training metrics go: a JSONL file in the run directory, TensorBoard, and optionally wandb."""
import json
from pathlib import Path


class MetricsLogger:
    """Writes one JSON line per log step; mirrors to TensorBoard/wandb when enabled (main process only)."""

    def __init__(self, run_dir, record, run_name, resume_step=0, tensorboard=True, use_wandb=False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._drop_lines_after(resume_step)
        self.writer = None
        self.wandb_run = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if use_wandb:
            import wandb

            self.wandb_run = wandb.init(project="sra", name=run_name, config=record, resume="allow")

    def _drop_lines_after(self, step):
        """A resumed run rewrites the steps after its checkpoint; drop their old lines first."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        self.path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))

    def log(self, step, values):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
