"""How the training processes share the model (`--parallel`).

ddp (the default, for models that fit on one device): every process holds the whole student, EMA and
optimizer state; gradients are all-reduced (accelerate's DistributedDataParallel).

fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block, then the rest of the model,
is sharded along its first dimension over the processes, so parameters, gradients and optimizer state
take 1/W of the memory; a block's parameters are all-gathered just before it runs and freed after. The
EMA (SRA's teacher, and a separate teacher if the method keeps one) is sharded the same way, parameter
by parameter, so its update stays local to each process, and its partial-depth `forward_features`
gathers only the blocks it runs. Mixed precision stays the step's autocast, with the outputs returned in
fp32, as accelerate does for DDP, so the two compute the same numbers. Checkpoints hold the gathered
(whole) state dicts, in the same files and keys as DDP's, except the optimizer state, which is keyed by
parameter name (torch.distributed.checkpoint's format); a run resumes with the strategy and process count
it was started with. FSDP needs torch >= FSDP_MIN_TORCH; the FSDP modules are imported only by its paths.
"""
import contextlib
import types

import torch

from errors import UserError

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch without public DTensors: nothing is ever sharded
    DTensor = ()

STRATEGIES = ("ddp", "fsdp")
# FSDP2 with an explicitly resharded root and register_fsdp_forward_method; the GPU machine's 2.11 and
# CI's 2.14 are tested.
FSDP_MIN_TORCH = (2, 8)
# CUDA graphs replay fixed collectives' buffers; FSDP2's all-gathers are not captured here.
CUDA_GRAPH_MODES = ("max-autotune", "reduce-overhead")
# The methods besides forward that a sharded backbone is called through (each must gather its blocks).
FORWARD_METHODS = ("forward_features", "forward_with_features")


def check_settings(strategy, mixed_precision, compile_mode):
    """Settings the strategy cannot train with (config errors)."""
    if strategy != "fsdp":
        return
    if mixed_precision == "fp16":
        raise UserError("--parallel fsdp runs with --mixed-precision bf16 or no: fp16's loss scaling would "
                        "skip steps on some processes and not others (each checks only its own gradient shard)")
    if compile_mode in CUDA_GRAPH_MODES:
        raise UserError(f"--compile-mode {compile_mode} records CUDA graphs, which --parallel fsdp's collectives "
                        "are not captured in; use default or max-autotune-no-cudagraphs")
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < FSDP_MIN_TORCH:
        raise UserError(f"--parallel fsdp needs torch >= {'.'.join(map(str, FSDP_MIN_TORCH))} (FSDP2); this is "
                        f"torch {torch.__version__}")


def check_strategy(strategy, accelerator):
    """A launch the strategy cannot run, reported before anything is built."""
    if strategy == "fsdp" and accelerator.num_processes < 2:
        raise UserError("--parallel fsdp shards the model over processes and this launch has one; launch "
                        "several (accelerate launch --num_processes N train.py …), or use --parallel ddp")


def shard(module, backbone, forward_only=False):
    """FSDP2 in place: every block of `backbone` (a submodule of `module`, or `module` itself) is its own
    unit, the rest of `module` the root unit. forward_only (the EMA, which never runs a backward): the root
    reshards after its forward too, so its parameters return to their shards; a trained root keeps them
    gathered for the backward that follows (torch's default)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in backbone.block_list:
        fully_shard(block)
    fully_shard(module, **({"reshard_after_forward": True} if forward_only else {}))
    if module is backbone:
        for name in FORWARD_METHODS:
            register_fsdp_forward_method(module, name)
    return module


def prepare_student(student, accelerator, strategy):
    """The module that runs the step: DDP's wrapper, or the student itself sharded in place. Either way
    its forward runs under the step's autocast and returns fp32 (what accelerate gives DDP), so the losses
    see the same dtypes under both strategies."""
    if strategy != "fsdp":
        return accelerator.prepare_model(student)
    if accelerator.native_amp:
        from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

        autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
        student.forward = types.MethodType(convert_outputs_to_fp32(autocast(type(student).forward)), student)
    return shard(student, student.backbone)


def is_sharded(module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def no_sync(trained, accelerator):
    """Gradients are not reduced across processes inside this context (all micro-batches but the last)."""
    if is_sharded(trained):
        return _fsdp_no_sync(trained)
    return accelerator.no_sync(trained)


@contextlib.contextmanager
def _fsdp_no_sync(trained):
    trained.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        trained.set_requires_gradient_sync(True)


def local(tensor):
    """This process's part of a sharded tensor (the tensor itself when it is not distributed); writes go
    through to the distributed tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor):
    """The value of a distributed tensor on every process: a no-op for a replicated one, a reduction for
    a partial one (a norm summed over shards, as some torch versions return it); plain tensors as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def full_state_dict(module, keep=True):
    """module.state_dict() with every sharded tensor gathered whole onto the CPU; a collective when the
    module is sharded (every process must call it), the plain state dict otherwise. keep=False (processes
    that do not write): each gathered tensor is dropped at once and None returned, so host memory holds
    one copy, on the writing process."""
    state = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
            value = value.cpu() if keep else None
        state[key] = value
    return state if keep else None


@torch.no_grad()
def load_full_state_dict(module, state):
    """Load a whole state dict (as full_state_dict gives) into a module, sharded or not; strict keys. Each
    process keeps its own shard of every tensor (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    current = module.state_dict()
    pieces = {}
    for key, value in state.items():
        target = current.get(key)
        if isinstance(target, DTensor):
            value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                                      src_data_rank=None)
        pieces[key] = value
    module.load_state_dict(pieces, strict=True)


def optimizer_state_dict(student, optimizer):
    """The optimizer's state: torch's own format under DDP; gathered whole and keyed by parameter name
    under FSDP (a collective)."""
    if not is_sharded(student):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # whole tensors on the CPU of the first process only (the others get an empty dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(student, optimizer, options=options)


def load_optimizer_state_dict(student, optimizer, state):
    if not is_sharded(student):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(student, optimizer, state, options=StateDictOptions(full_state_dict=True))
