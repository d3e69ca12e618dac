"""sample_ddp.py and sampling/: per-index determinism, resume, the npz format, public checkpoints,
errors for bad input. Tiny models (3 blocks, 8×8 latents) and a tiny random VAE (16×16 images)."""
import argparse
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import RunsCode, project_meta, randomize_, release_with_payload, tiny_model, tiny_vae_dir
from PIL import Image

import models
import sample_ddp
import sampling
from errors import UserError
from objectives.registry import create_objective
from transport import ReversedTime

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10  # tiny_model's
FAST = ["--num-steps", "3"]  # enough steps to exercise every sampler; seconds per test


def project_checkpoint(path: Path, name="SiT-S/2", seed=0) -> Path:
    """A checkpoint as train.py writes it: metadata, config, online and EMA weights (different)."""
    ema, online = tiny_model(name, seed=seed), tiny_model(name, seed=seed + 1)
    torch.save({
        "format": models.CHECKPOINT_FORMAT,
        "meta": project_meta(ema, name),
        "model": online.state_dict(),
        "ema": ema.state_dict(),
    }, path)
    return path


def small_public_model():
    """The smallest registered size (public checkpoints load by registered name): SiT-T/2 at 8×8."""
    return models.create_model("SiT-T/2", input_size=8, in_channels=4, num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    return {
        "root": root,
        "vae": tiny_vae_dir(root),
        "sit": project_checkpoint(root / "sit.pt"),
        "dit": project_checkpoint(root / "dit.pt", "DiT-S/2"),
    }


def run(files, out, *flags, ckpt="sit"):
    """sample_ddp.main on a checkpoint of `files` (or a path) with the tiny VAE."""
    ckpt = files[ckpt] if isinstance(ckpt, str) else ckpt
    argv = ["--ckpt", str(ckpt), "--vae", str(files["vae"]), "--output-dir", str(out), *flags]
    return sample_ddp.main(argv)


def load(npz):
    with np.load(npz) as data:
        return {key: data[key] for key in data.files}


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- the library pieces ------------------------------------------------------------------------

def test_noise_and_labels_depend_on_seed_and_index_only():
    shape = (4, 8, 8)
    seven = sampling.initial_noise(3, range(7), shape)  # (7, 4, 8, 8)
    assert torch.equal(sampling.initial_noise(3, [4, 5], shape), seven[4:6])
    assert not torch.equal(sampling.initial_noise(3, [4], shape), sampling.initial_noise(4, [4], shape))
    uniform = sampling.ClassLabels(3, 100, NUM_CLASSES, balanced=False)
    assert torch.equal(uniform([10, 11]), uniform(range(20))[10:12])
    assert uniform(range(100)).dtype == torch.int64
    balanced = sampling.ClassLabels(3, 100, NUM_CLASSES, balanced=True)(range(100))
    assert torch.equal(torch.bincount(balanced, minlength=NUM_CLASSES), torch.full((NUM_CLASSES,), 10))
    uneven = sampling.ClassLabels(3, 23, NUM_CLASSES, balanced=True)(range(23))
    assert sorted(torch.bincount(uneven, minlength=NUM_CLASSES).tolist()) == [2] * 7 + [3] * 3


def test_rounding_closed_forms():
    x = torch.tensor([-1.0, 0.0, 1.0, -2.0, 2.0, 0.5]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    nearest = sampling.to_uint8(x, "nearest")[0, 0, :, 0]
    floor = sampling.to_uint8(x, "floor")[0, 0, :, 0]
    assert nearest.tolist() == [0, 128, 255, 0, 255, 191]  # 127.5·x + 128 truncated
    assert floor.tolist() == [0, 127, 255, 0, 255, 191]  # 127.5·(x + 1) truncated
    assert sampling.to_uint8(x, "nearest").shape == (1, 1, 6, 3)


def test_plan_batches_handles_remainders_and_resumes_on_the_same_ranges():
    done = np.zeros(10, dtype=bool)
    assert sampling.plan_batches(done, 4) == [(0, 4), (4, 8), (8, 10)]
    done[4:8] = True
    assert sampling.plan_batches(done, 4) == [(0, 4), (8, 10)]
    done[[1, 2]] = True
    assert sampling.plan_batches(done, 4) == [(0, 1), (3, 4), (8, 10)]


def test_presets_set_the_papers_settings_and_flags_override():
    sra = sampling.resolve("sit-xl2-sra-256-cfg", {"seed": None})
    assert (sra["sampler"], sra["num_steps"], sra["cfg_scale"]) == ("sde", 250, 1.8)
    assert sra["guidance_interval"] == (0.0, 0.7)
    assert sra["cfg_channels"] == "all" and sra["num_samples"] == 50_000
    assert sampling.resolve("sit-xl2-sra-256", {})["cfg_scale"] == 1.0
    assert sampling.resolve("dit-xl2-256-cfg", {"cfg_scale": 4.0})["cfg_scale"] == 4.0
    assert sampling.resolve(None, {})["rounding"] == "nearest"
    dit_sra = sampling.resolve("dit-xl2-sra-256", {})  # the SRA release's DiT-SRA/gen.sh and generate.py
    assert (dit_sra["family"], dit_sra["sampler"], dit_sra["num_steps"]) == ("DiT", "ddpm", 250)
    assert (dit_sra["cfg_scale"], dit_sra["rounding"]) == (1.0, "floor")


# --- sample_ddp.py end to end ------------------------------------------------------------------

def test_npz_format_exact_count_and_pngs(files, tmp_path):
    result = run(files, tmp_path, "--num-samples", "7", "--per-proc-batch-size", "3", "--save-png", *FAST)
    data = load(result["npz"])
    assert sorted(data) == ["arr_0", "labels"]
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (7, 16, 16, 3)
    assert data["labels"].dtype == np.int64 and data["labels"].shape == (7,)
    expected_labels = sampling.ClassLabels(0, 7, NUM_CLASSES, balanced=False)(range(7))
    assert torch.equal(torch.from_numpy(data["labels"]), expected_labels)
    png_dir = result["npz"].with_suffix("")
    assert np.array_equal(np.asarray(Image.open(png_dir / sampling.png_name(6))), data["arr_0"][6])
    assert len(list(png_dir.glob("*.png"))) == 7
    assert not result["npz"].with_suffix(".work").exists()  # shards removed once assembled
    assert result["settings"]["weights"] == "ema" and result["settings"]["sampler"] == "sde"
    again = run(files, tmp_path, "--num-samples", "7", "--per-proc-batch-size", "3", "--save-png", *FAST)
    assert again["made"] == 0 and digest(again["npz"]) == digest(result["npz"])


def test_batch_size_does_not_change_ode_samples(files, tmp_path):
    guided = ["--cfg-scale", "2", "--guidance-interval", "0", "0.5"]
    common = ["--num-samples", "7", "--sampler", "heun", *guided, *FAST]
    by_three = run(files, tmp_path / "a", *common, "--per-proc-batch-size", "3")
    by_five = run(files, tmp_path / "b", *common, "--per-proc-batch-size", "5")
    assert digest(by_three["npz"]) == digest(by_five["npz"])
    assert "per_proc_batch_size" not in by_three["settings"]


def test_stochastic_sampler_images_do_not_depend_on_the_batch_size(files, tmp_path):
    """The SDE's own noise comes from one generator per sample (sampling.seeds.sampler_generators)."""
    flags = ["--num-samples", "5", *FAST]
    by_five = run(files, tmp_path / "a", *flags, "--per-proc-batch-size", "5")
    by_two = run(files, tmp_path / "b", *flags, "--per-proc-batch-size", "2")
    assert digest(by_five["npz"]) == digest(by_two["npz"])
    assert "per_proc_batch_size" not in by_five["settings"]


def test_resume_with_another_batch_size_gives_the_identical_npz(files, tmp_path, monkeypatch):
    flags = ["--num-samples", "10", *FAST]
    whole = run(files, tmp_path / "whole", *flags, "--per-proc-batch-size", "4")

    write = sampling.ShardStore.write
    written = []

    def write_then_die(store, start, images, labels):
        if len(written) == 2:
            (store.work_dir / "0000006-0000009.npz.123.tmp").write_bytes(b"half a shard")  # cut short
            raise KeyboardInterrupt("stopped")
        written.append(start)
        write(store, start, images, labels)

    monkeypatch.setattr(sampling.ShardStore, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(files, tmp_path / "cut", *flags, "--per-proc-batch-size", "3")
    monkeypatch.setattr(sampling.ShardStore, "write", write)
    resumed = run(files, tmp_path / "cut", *flags, "--per-proc-batch-size", "2")
    assert resumed["made"] == 10 - 6  # only the missing indices: 6..9
    assert digest(resumed["npz"]) == digest(whole["npz"])


def test_resume_after_sigkill_gives_the_identical_npz(files, tmp_path):
    """A real kill of a stochastic (SDE) run after its first batches; the rerun finishes it."""
    flags = ["--ckpt", str(files["sit"]), "--vae", str(files["vae"]), "--num-samples", "12",
             "--per-proc-batch-size", "2", *FAST]
    cut = [*flags, "--output-dir", str(tmp_path / "cut")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, str(REPO / "sample_ddp.py"), *cut], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list((tmp_path / "cut").glob("*.work/*-*.npz")) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not list((tmp_path / "cut").glob("*.npz")), "the run finished before it could be killed"
    resumed = sample_ddp.main(cut)
    assert 0 < resumed["made"] < 12
    whole = sample_ddp.main([*flags, "--output-dir", str(tmp_path / "whole")])
    assert digest(resumed["npz"]) == digest(whole["npz"])


def test_two_gloo_processes_equal_one_process_byte_for_byte(files, tmp_path):
    flags = ["--ckpt", str(files["sit"]), "--vae", str(files["vae"]), "--num-samples", "10",
             "--per-proc-batch-size", "3", "--cfg-scale", "1.5", "--guidance-interval", "0", "0.7", *FAST]
    one = sample_ddp.main([*flags, "--output-dir", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "sample_ddp.py"), *flags, "--output-dir", str(tmp_path / "two")]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "over 2 processes" in completed.stdout
    two = tmp_path / "two" / one["npz"].name
    assert digest(two) == digest(one["npz"])


def test_dit_checkpoint_ddpm_and_ddim_with_release_channels(files, tmp_path, monkeypatch):
    # The guidance settings reach the sampler; the images cannot show it: at these tiny weights guiding
    # 3 channels or all 4 differs in a few pixels by one grey level.
    guidance = []
    guided_model_fn = models.guided_model_fn

    def recording_guided_model_fn(model, y, **options):
        guidance.append({key: value for key, value in options.items() if key != "null"})
        assert torch.equal(options["null"], torch.full_like(y, NUM_CLASSES))  # the null class
        return guided_model_fn(model, y, **options)

    monkeypatch.setattr(models, "guided_model_fn", recording_guided_model_fn)
    guided = ["--num-samples", "4", "--cfg-scale", "1.5", "--guidance-interval", "0", "0.6", "--cfg-channels", "3",
              *FAST]
    by_four = run(files, tmp_path / "a", *guided, "--per-proc-batch-size", "4", ckpt="dit")
    assert guidance == [{"scale": 1.5, "interval": (0.0, 0.6), "guide_channels": models.RELEASE_DIT_GUIDED_CHANNELS}]
    by_three = run(files, tmp_path / "b", *guided, "--per-proc-batch-size", "3", ckpt="dit")
    assert by_four["settings"]["sampler"] == "ddpm"
    assert by_four["settings"]["time_convention"] == models.DISCRETE_STEPS
    assert digest(by_four["npz"]) == digest(by_three["npz"])  # DDPM noise per sample too
    ddim = run(files, tmp_path / "c", *guided, "--sampler", "ddim", "--ddim-eta", "0.5", ckpt="dit")
    assert ddim["settings"]["ddim_eta"] == 0.5
    assert load(ddim["npz"])["arr_0"].shape == (4, 16, 16, 3)


def test_public_sit_release_samples_in_its_reversed_time(files, tmp_path):
    """A bare state dict with public key names (the SiT release format, t = 1 is data): sample_ddp
    wraps it in ReversedTime; the npz equals the library pipeline run by hand."""
    release = randomize_(small_public_model(), seed=5)
    path = files["root"] / "SiT-T-2-release.pt"
    torch.save(release.state_dict(), path)
    result = run(files, tmp_path, "--model", "SiT-T/2", "--sampler", "euler", "--num-samples", "3", *FAST,
                 ckpt=path)
    assert result["settings"]["time_convention"] == models.DATA_AT_1

    from preprocessing.vae import load_vae

    vae = load_vae(str(files["vae"]), torch.device("cpu"))
    z = sampling.initial_noise(0, range(3), (4, 8, 8))
    y = sampling.ClassLabels(0, 3, NUM_CLASSES, False)(range(3))
    with torch.no_grad():
        x0 = create_objective("flow").sample(models.guided_model_fn(ReversedTime(release.eval()), y), z,
                                             method="euler", num_steps=3)
        images = vae.model.decode(x0 / vae.scaling.scale + vae.scaling.shift).sample
    assert np.array_equal(load(result["npz"])["arr_0"], sampling.to_uint8(images, "nearest"))


def test_sra_release_training_file_samples(files, tmp_path):
    """The SRA/REPA release's training file: model/ema/opt/args (a pickled Namespace) plus ap_head."""
    model = randomize_(small_public_model(), seed=6)
    head = {"ap_head.linear1.weight": torch.zeros(2, 2)}
    path = files["root"] / "sra-release.pt"
    torch.save({"model": {**model.state_dict(), **head}, "ema": {**model.state_dict(), **head}, "opt": {},
                "args": argparse.Namespace(model="SiT-XL/2"), "steps": 10}, path)
    result = run(files, tmp_path, "--model", "SiT-T/2", "--num-samples", "2", *FAST, ckpt=path)
    assert result["settings"]["time_convention"] == models.DATA_AT_0
    assert load(result["npz"])["arr_0"].shape == (2, 16, 16, 3)


def test_default_vae_is_the_training_datasets_with_its_scaling(files, tmp_path):
    from preprocessing import store

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    index = {"kind": "vae", "vae": str(files["vae"]), "scale": 0.5, "shift": 0.1}
    store.write_json(data_dir / store.INDEX_FILE, index)
    name, source, dataset = sampling.pipeline.choose_vae(None, {"data_dir": str(data_dir), "vae": None})
    assert name == str(files["vae"]) and "dataset" in source and dataset["scale"] == 0.5
    assert sampling.pipeline.choose_vae(None, {})[0] == sampling.DEFAULT_VAE
    decoder = sampling.load_decoder(None, {"data_dir": str(data_dir)}, torch.device("cpu"))
    from preprocessing.vae import load_vae

    vae = load_vae(str(files["vae"]), torch.device("cpu"))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(decoder.decode(x), vae.model.decode(x / 0.5 + 0.1).sample)
    # The dataset's VAE by content: other weights saved under its name are refused unless asked for.
    store.write_json(data_dir / store.INDEX_FILE, {**index, "vae_sha256": vae.weights_sha256})
    sampling.load_decoder(None, {"data_dir": str(data_dir)}, torch.device("cpu"))
    store.write_json(data_dir / store.INDEX_FILE, {**index, "vae_sha256": "0" * 64})
    with pytest.raises(UserError, match="now holds other weights .* than the ones that encoded the training"):
        sampling.load_decoder(None, {"data_dir": str(data_dir)}, torch.device("cpu"))
    sampling.load_decoder(str(files["vae"]), {"data_dir": str(data_dir)}, torch.device("cpu"))  # --vae: on purpose


def test_training_info_of_both_checkpoint_formats(files, tmp_path):
    """Version 2 records the objective in its metadata; a version-1 file (flat config) still samples with
    the objective its config names."""
    info = sampling.training_info(files["dit"])
    assert info["objective"] == {"kind": "ddpm", "num_timesteps": 1000, "beta_schedule": "linear",
                                 "learn_sigma": True}
    model = tiny_model("SiT-S/2")
    v1 = tmp_path / "v1.pt"
    torch.save({"format": models.CHECKPOINT_FORMAT_V1, "meta": models.checkpoint_metadata(model, models.DATA_AT_0),
                "ema": model.state_dict(), "config": {"model": "SiT-S/2", "path": "cosine",
                                                      "prediction": "velocity", "data_dir": None, "vae": None}}, v1)
    info = sampling.training_info(v1)
    assert info["objective"] == {"kind": "flow", "path": "cosine", "prediction": "velocity"}
    loaded = models.load_checkpoint(v1)
    assert sampling.build_objective(loaded, info).path.name == "cosine"
    result = run(files, tmp_path, "--num-samples", "2", *FAST, ckpt=v1)
    assert load(result["npz"])["arr_0"].shape == (2, 16, 16, 3)


# --- bad input: a clear error before any sample ------------------------------------------------

@pytest.mark.parametrize("flags, match", [
    (["--ckpt", "missing.pt"], "checkpoint not found: missing.pt"),
    (["--vae", "none"], "takes 4-channel inputs, but pixel-space sampling"),
    (["--image-size", "256"], "--image-size 256 does not fit.*8×8 inputs decode to 16×16"),
    (["--sampler", "ddpm"], "--sampler ddpm does not fit a SiT model"),
    (["--preset", "dit-xl2-256-cfg"], "the preset is for DiT models"),
    (["--guidance-interval", "0.8", "0.2"], "--guidance-interval needs 0 <= LOW <= HIGH <= 1"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--per-proc-batch-size", "0"], "--per-proc-batch-size must be >= 1"),
    (["--ddim-eta", "1"], "--ddim-eta applies to the ddim sampler"),
    (["--cfg-scale", "-3"], r"--cfg-scale must be finite and > 0 \(1 means no guidance.*got -3"),
    (["--cfg-scale", "0"], "--cfg-scale must be finite and > 0"),
    (["--cfg-scale", "inf"], "--cfg-scale must be finite and > 0"),
    (["--sampler", "ddim", "--ddim-eta", "inf"], "--ddim-eta must be finite and >= 0"),
    (["--model", "DiT-S/2"], r"the checkpoint holds SiT-S/2 \(its metadata\); --model DiT-S/2 contradicts it"),
    (["--time-convention", "data_at_1"], r"time convention data_at_0 \(its metadata\); --time-convention data_at_1"),
])
def test_bad_input_fails_before_sampling(files, tmp_path, flags, match):
    with pytest.raises(UserError, match=match):
        run(files, tmp_path / "out", *FAST, "--num-samples", "2", *flags)  # a missed check fails fast
    assert not (tmp_path / "out").exists()  # nothing written, not even the output folder


def test_ddpm_step_count_out_of_range_fails_before_sampling(files, tmp_path):
    for steps in ("1", "1001"):
        with pytest.raises(UserError, match=f"--num-steps {steps} does not fit a DiT model: it samples with 2 to 1000"):
            run(files, tmp_path / "out", "--num-samples", "2", "--num-steps", steps, ckpt="dit")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_directory_fails_before_sampling(files, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match="output directory .*a-file/samples is not writable"):
        run(files, blocker / "samples", "--num-samples", "2", *FAST)


def test_malformed_checkpoints_are_one_line_errors_naming_the_file(files, tmp_path):
    whole = files["sit"].read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 3])
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 8)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"format": models.CHECKPOINT_FORMAT, "ema": tiny_model().state_dict()}, tmp_path / "no-meta.pt")
    wider = tiny_model(hidden_size=64)
    torch.save({"format": models.CHECKPOINT_FORMAT, "meta": project_meta(tiny_model(), "SiT-S/2"),
                "ema": wider.state_dict()}, tmp_path / "misfit.pt")  # weights of another width
    for name, match in [("truncated.pt", "not a readable checkpoint"), ("garbage.pt", "not a readable checkpoint"),
                        ("list.pt", "holds a list"), ("no-meta.pt", "metadata .* is malformed"),
                        ("misfit.pt", r"shape mismatch keys: .*checkpoint \(64,")]:
        with pytest.raises(UserError, match=match) as caught:
            run(files, tmp_path / "out", "--num-samples", "2", *FAST, ckpt=tmp_path / name)
        assert name in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_code_payload_in_a_release_is_refused_and_never_runs(files, tmp_path):
    marker = tmp_path / "payload-ran"
    path = release_with_payload(tmp_path / "release.pt", small_public_model().state_dict(),
                                RunsCode(command=f"touch '{marker}'"))
    with pytest.raises(UserError, match=r"release\.pt was not loaded: it pickles posix\.system.*would run code"):
        run(files, tmp_path / "out", "--model", "SiT-T/2", "--num-samples", "2", *FAST, ckpt=path)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, named", [
    (["--ckpt", "missing.pt"], "checkpoint not found: missing.pt"),
    (["--ckpt", "missing.pt", "--num-samples", "many"], "--num-samples: invalid int value: 'many'"),  # argparse's
])
def test_cli_reports_a_user_error_as_one_line_and_exit_status_2(tmp_path, argv, named):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    completed = subprocess.run([sys.executable, str(REPO / "sample_ddp.py"), *argv], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    lines = completed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], completed.stderr
    assert not list(tmp_path.iterdir())  # no output folder made for a run that cannot start


# --- the checkpoint is identified by its weights -------------------------------------------------

def retrain(path: Path, seed: int) -> Path:
    """Overwrite `path` with a checkpoint of other weights and the same byte size."""
    size = path.stat().st_size
    project_checkpoint(path, seed=seed)
    assert path.stat().st_size == size  # what a path-and-size identity cannot tell apart
    return path


def test_retrained_weights_in_the_same_file_are_other_settings(files, tmp_path):
    ckpt = project_checkpoint(tmp_path / "ckpt.pt")
    flags = ["--num-samples", "4", "--per-proc-batch-size", "2", *FAST]
    first = run(files, tmp_path / "out", *flags, ckpt=ckpt)
    old_digest = first["settings"]["ckpt_sha256"]
    assert old_digest == models.weights_sha256(tiny_model(seed=0).state_dict())  # the EMA weights sampled
    retrain(ckpt, seed=5)
    new_digest = models.weights_sha256(tiny_model(seed=5).state_dict())
    with pytest.raises(UserError, match=f"other settings \\(ckpt_sha256: '{old_digest}' -> '{new_digest}'\\)"):
        run(files, tmp_path / "out", *flags, ckpt=ckpt)


def test_retrained_weights_never_reuse_the_shards_of_an_interrupted_run(files, tmp_path, monkeypatch):
    ckpt = project_checkpoint(tmp_path / "ckpt.pt")
    flags = ["--num-samples", "6", "--per-proc-batch-size", "2", *FAST]
    write = sampling.ShardStore.write

    def write_once_then_die(store, start, images, labels):
        if list(store.work_dir.glob("*-*.npz")):
            raise KeyboardInterrupt("stopped")
        write(store, start, images, labels)

    monkeypatch.setattr(sampling.ShardStore, "write", write_once_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(files, tmp_path / "out", *flags, ckpt=ckpt)
    monkeypatch.setattr(sampling.ShardStore, "write", write)
    (work,) = (tmp_path / "out").glob("*.work")
    shards = sorted(path.name for path in work.glob("*-*.npz"))
    retrain(ckpt, seed=5)
    with pytest.raises(UserError, match=r"settings\.json records samples made with other settings \(ckpt_sha256: "):
        run(files, tmp_path / "out", *flags, ckpt=ckpt)
    assert sorted(path.name for path in work.glob("*-*.npz")) == shards == ["0000000-0000002.npz"]


def test_the_same_weights_moved_to_another_path_reuse_the_finished_samples(files, tmp_path):
    """A decision: the images depend on the weights, not on where their file lies, so a moved (or
    copied) identical checkpoint finds its samples complete."""
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    flags = ["--num-samples", "3", *FAST]
    first = run(files, tmp_path / "out", *flags, ckpt=project_checkpoint(tmp_path / "old" / "ckpt.pt"))
    moved = (tmp_path / "old" / "ckpt.pt").rename(tmp_path / "new" / "ckpt.pt")
    again = run(files, tmp_path / "out", *flags, ckpt=moved)
    assert again["made"] == 0 and again["npz"] == first["npz"]
    assert again["settings"]["ckpt"] == str(moved.resolve()) != first["settings"]["ckpt"]


def test_latent_channel_mismatch_with_the_vae(files, tmp_path):
    pixels = randomize_(models.create_model("SiT-S/2", input_size=8, in_channels=3, num_classes=NUM_CLASSES,
                                            depth=3, hidden_size=32, num_heads=2))
    path = tmp_path / "pixels.pt"
    torch.save({"format": models.CHECKPOINT_FORMAT, "meta": project_meta(pixels, "SiT-S/2"),
                "ema": pixels.state_dict()}, path)
    with pytest.raises(ValueError, match="takes 3-channel inputs, but the VAE .*tiny-vae decodes 4 channels"):
        run(files, tmp_path, ckpt=path)
    result = sample_ddp.main(["--ckpt", str(path), "--vae", "none", "--num-samples", "2",
                              "--output-dir", str(tmp_path), *FAST])
    assert load(result["npz"])["arr_0"].shape == (2, 8, 8, 3)  # pixel space: the sample is the image


# --- a damaged work folder, durable writes, the --output path ------------------------------------

def interrupted_run(files, out, flags, shards_before_kill):
    """Run until `shards_before_kill` shards are written, then stop as a kill would: returns the work folder."""
    write = sampling.ShardStore.write
    written = []

    def write_then_die(store, start, images, records):
        if len(written) == shards_before_kill:
            raise KeyboardInterrupt("stopped")
        written.append(start)
        write(store, start, images, records)

    patch = pytest.MonkeyPatch()
    patch.setattr(sampling.ShardStore, "write", write_then_die)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(files, out, *flags)
    finally:
        patch.undo()
    (work,) = Path(out).glob("*.work")
    return work


def rewrite_shard(path, **arrays):
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def truncate(path):
    with open(path, "r+b") as file:
        file.truncate(100)


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the middle of the stored images: the zip's CRC-32 no longer matches
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated": truncate,
    "bad-crc": flip_a_byte,
    "wrong-keys": lambda path: rewrite_shard(path, images=np.zeros((3, 16, 16, 3), np.uint8),
                                             classes=np.zeros(3, np.int64)),
    "wrong-dtype": lambda path: rewrite_shard(path, images=np.zeros((3, 16, 16, 3), np.float32),
                                              labels=np.zeros(3, np.int64)),
    "wrong-count": lambda path: rewrite_shard(path, images=np.zeros((2, 16, 16, 3), np.uint8),
                                              labels=np.zeros(2, np.int64)),
    "wrong-size": lambda path: rewrite_shard(path, images=np.zeros((3, 8, 8, 3), np.uint8),
                                             labels=np.zeros(3, np.int64)),
    "not-a-zip": lambda path: path.write_bytes(b"garbage" * 100),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_shard_is_reported_and_resampled(files, tmp_path, capsys, damage):
    flags = ["--num-samples", "8", "--per-proc-batch-size", "3", *FAST]
    whole = run(files, tmp_path / "whole", *flags)
    work = interrupted_run(files, tmp_path / "cut", flags, shards_before_kill=2)  # 0-3 and 3-6 written
    DAMAGES[damage](work / "0000000-0000003.npz")
    stale = tmp_path / "cut" / f"{whole['npz'].name}.4242.tmp"  # a killed assembly's leftover
    stale.write_bytes(b"half an npz")
    capsys.readouterr()
    # A tiny shard's header read takes in the whole member, so even its CRC-32 fails at the scan; in large
    # shards the data's CRC-32 fails when the assembly reads it (test_a_failed_assembly_sets_the_shard_aside).
    resumed = run(files, tmp_path / "cut", *flags)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "0000000-0000003.npz" in warnings[0] and "resampl" in warnings[0], warnings
    assert resumed["made"] == 8 - 3  # the damaged shard's 3 and the missing 2
    assert digest(resumed["npz"]) == digest(whole["npz"])
    assert not list((tmp_path / "cut").rglob("*.tmp"))


def test_a_failed_assembly_sets_the_shard_aside(tmp_path):
    store = sampling.ShardStore(tmp_path / "x.work")
    store.prepare({"image_size": 4})
    store.write(0, np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))
    store.write(2, np.ones((2, 4, 4, 3), np.uint8), np.ones(2, np.int64))
    flip_a_byte(store.work_dir / "0000002-0000004.npz")  # a bad CRC-32 the scan does not read, or later damage
    with pytest.raises(UserError, match=r"0000002-0000004\.npz could not be read .*moved aside .*rerun the same"):
        store.assemble(4, tmp_path / "x.npz")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["x.work"]
    assert [start for start, _, _ in store.shards()] == [0]  # set aside: its indices are missing again


def test_shards_settings_and_npz_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    import stat

    import sampling.shards

    synced = []
    fsync = os.fsync

    def recording_fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append((kind, sorted(path.name for path in tmp_path.rglob("*") if path.is_file())))
        fsync(fd)

    monkeypatch.setattr(sampling.shards.os, "fsync", recording_fsync)
    store = sampling.ShardStore(tmp_path / "x.work")
    store.prepare({"image_size": 4})
    assert [kind for kind, _ in synced] == ["file", "dir"]
    assert synced[0][1] == [f"settings.json.{os.getpid()}.tmp"]  # the data reached the disk before the rename
    synced.clear()
    store.write(0, np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))
    store.assemble(2, tmp_path / "x.npz")
    assert [kind for kind, _ in synced] == ["file", "dir", "file", "dir"]
    assert f"x.npz.{os.getpid()}.tmp" in synced[2][1] and "x.npz" not in synced[2][1]


def fail_on_model_load(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(sample_ddp, "load_model", load_model)


@pytest.mark.parametrize("output, extra, match", [
    ("out/mysamples", [], r"--output .*mysamples must end in \.npz"),
    ("out/mysamples", ["--save-png"], r"--output .*mysamples must end in \.npz"),
    ("out/ref.npz", [], r"out/ref\.npz exists and has no settings record beside it"),
    ("out/dir.npz", [], r"out/dir\.npz exists and is not a file"),
    ("out/blocker.npz", ["--save-png"], r"the PNG folder .*out/blocker, exists and is not a directory"),
    ("out/ref.npz/x.npz", [], r"not writable: .*ref\.npz is not a directory"),
])
def test_a_bad_output_path_fails_before_the_model_loads(files, tmp_path, monkeypatch, output, extra, match):
    out = tmp_path / "out"
    out.mkdir()
    np.savez(out / "ref.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))  # someone else's file
    (out / "dir.npz").mkdir()
    (out / "blocker").write_text("a file where the PNGs would go")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    fail_on_model_load(monkeypatch)
    with pytest.raises(UserError, match=match):
        run(files, tmp_path / "unused", "--output", str(tmp_path / output), "--num-samples", "2", *extra, *FAST)
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    assert sorted(path.name for path in out.iterdir()) == ["blocker", "dir.npz", "ref.npz"]


def test_an_npz_assembled_before_a_kill_is_completed_by_the_rerun(files, tmp_path, monkeypatch):
    """Killed after the npz appeared but before its settings record: the work folder's record vouches for it."""
    flags = ["--num-samples", "3", *FAST]
    write_settings = sample_ddp.write_settings

    def die_before_the_record(path, settings):
        if Path(path).suffix == ".json" and not Path(path).name == "settings.json":
            raise KeyboardInterrupt("stopped")
        write_settings(path, settings)

    monkeypatch.setattr(sample_ddp, "write_settings", die_before_the_record)
    with pytest.raises(KeyboardInterrupt):
        run(files, tmp_path, *flags)
    monkeypatch.setattr(sample_ddp, "write_settings", write_settings)
    (npz,) = tmp_path.glob("*.npz")
    first = digest(npz)
    again = run(files, tmp_path, *flags)
    assert again["made"] == 0 and again["npz"] == npz and digest(npz) == first
    assert npz.with_suffix(".json").is_file() and not npz.with_suffix(".work").exists()
