import pytest
import torch

# The suite runs on 2 cores; more threads than cores only adds contention.
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny convolutions run ~100x slower when two threads contend for a busy 2-core machine: a module
    marked `pytestmark = pytest.mark.usefixtures("one_torch_thread")` runs on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Four classes of 8×8 images with different colours, stored in pixel space (train.py's tests)."""
    from preprocessing.__main__ import main as preprocess
    from tests.helpers import write_class_images

    root = tmp_path_factory.mktemp("data")
    write_class_images(root / "images")
    preprocess(["--input", str(root / "images"), "--output", str(root / "pixels"), "--vae", "none",
                "--resolution", "8", "--num-workers", "0"])
    return str(root / "pixels")
