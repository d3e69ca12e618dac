"""The non-finite guard: a step whose gradients are not finite is skipped (optimizer and EMA), counted on
the device, and a run of too many in a row stops training.

The loop never waits on the host for this: each step writes its flag into a device buffer, and the
host reads the buffer every `check_every` steps (never more than the limit or the log interval), so the
longest streak is known exactly, with its steps, and the run stops at most limit − 1 steps after the
streak reached the limit. Skipped steps leave the weights unchanged, so nothing is lost meanwhile.
"""
import torch


class NonFiniteGuard:
    def __init__(self, limit, log_every, device, start_step=0, counters=None):
        """counters: {"nonfinite_total", "nonfinite_run"} of the checkpoint at `start_step`, or None."""
        counters = counters or {}
        self.limit = limit
        self.check_every = min(limit, log_every)
        self.total = torch.tensor(float(counters.get("nonfinite_total", 0)), device=device)
        self.run = torch.tensor(float(counters.get("nonfinite_run", 0)), device=device)
        self.flags = torch.zeros(self.check_every, device=device)  # 1 where the step was skipped
        self.steps = []  # the steps whose flags are in the buffer, in order
        streak = int(counters.get("nonfinite_run", 0))  # a streak may run on from before the checkpoint
        self.streak = list(range(start_step - streak + 1, start_step + 1))

    def record(self, step, finite):
        """After each step; device work only."""
        skipped = (~finite).float()
        self.total += skipped
        self.run = (self.run + 1) * skipped
        self.flags[len(self.steps)] = skipped
        self.steps.append(step)

    def due(self):
        return len(self.steps) == self.check_every

    def check(self):
        """Read the window (one host sync). Returns (length, steps) of the first streak that reached the
        limit (it may have begun in an earlier window), or None; then starts a new window."""
        found = None
        for step, skipped in zip(self.steps, self.flags[: len(self.steps)].tolist()):
            self.streak = self.streak + [step] if skipped else []
            if len(self.streak) >= self.limit and found is None:
                found = (len(self.streak), self.streak[:])
        self.steps = []
        return found

    def counters(self):
        return {"nonfinite_total": self.total, "nonfinite_run": self.run}
