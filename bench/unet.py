"""Unet3D training-step speed, memory and FLOP efficiency against the machine's matmul peak.

    .venv/bin/python bench/unet.py                     # CPU, reduced fixed config (4 frames)
    .venv/bin/python bench/unet.py --full              # fixed config as specified (16 frames)
    .venv/bin/python bench/unet.py --device cuda       # GPU, full fixed config
    .venv/bin/python bench/unet.py --compile           # also the fixed bf16 step under torch.compile
    .venv/bin/python bench/unet.py --threads 1         # on a shared, loaded machine: with more
                                                       # runnable processes than cores, 2-thread
                                                       # OpenMP ops stall (3-10x slower steps)

Configs: `fixed` = Unet3D(dim=64, dim_mults=(1, 2, 4, 8), cond_dim=768), batch 2, 64x64, 16 frames
(CPU default 4 frames, --full for 16); `tiny` = dim 16, dim_mults (1, 2), 8 frames, 32x32.
Each (config, dtype, checkpointing) case runs in its own process. CPU peak memory is that
process's resident high-water mark during the steps above its size after building the model and
inputs (Linux VmHWM, reset through /proc/self/clear_refs; not ru_maxrss, which a child inherits
from its parent's peak across fork and exec); on CUDA it is torch.cuda.max_memory_allocated above
the memory held before the steps. FLOPs are
model FLOPs of one fwd+bwd step without recompute (FlopCounterMode, with CPU flash attention
registered), so checkpointing shows as lower MFU.

Dense rate: the bf16 3x3 convolutions of the fixed config's levels are timed too; where oneDNN's
convolutions outrun every matmul shape (Zen 4), the summary also gives the step's share of that
higher rate.

Roofline: the script also measures the memory bandwidth (a large tensor copy) and counts the
operand bytes of the step (every input and output of every aten op that moves data, in the dtype
it ran in; views, aliasing reshapes and bare allocations are not counted). bytes / bandwidth is
the time this sequence of ops needs just to stream its operands once; max(FLOPs / peak,
bytes / bandwidth) is its roofline time, and FLOPs / peak over that time is
the highest fraction of the matmul peak this op sequence can reach on this machine.

Kernels: on CPU, the fixed bf16 step with vdm's fused CPU kernels on and off (the PyTorch path),
alternating steps in one process.

Breakdown: for the fixed bf16 step, one profiled step split by op class (convolution, matmul,
batched matmul, layout copies and casts, norms, softmax, vdm's fused CPU kernels, the rest),
each class's share scaled to the unprofiled step time, with the FLOP rate of the classes that
carry FLOPs, and the time the dense classes alone take against the time the whole step may take
at 35% of the peak.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {
    "fixed": dict(model=dict(dim=64, dim_mults=(1, 2, 4, 8), cond_dim=768),
                  batch=2, frames=16, size=64, text_len=16),
    "tiny": dict(model=dict(dim=16, dim_mults=(1, 2), cond_dim=64, attn_heads=2,
                            attn_dim_head=16), batch=2, frames=8, size=32, text_len=8),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def register_cpu_flash_flops():
    """FlopCounterMode knows the CUDA SDPA kernels but not the CPU flash one, nor vdm's fused CPU
    temporal attention; count both as SDPA (the kernel's backward recompute is not counted)."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return
    from vdm.model import cpu_kernels
    if cpu_kernels.available():
        ops = torch.ops.vdm_cpu

        def sdpa_shape(qkv, frames, heads):  # as (positions, heads, frames, dim_head)
            dim_head = qkv[-1] // (3 * heads)
            positions = qkv[0] // frames * (math.prod(qkv) // (qkv[0] * qkv[-1]))
            return positions, heads, frames, dim_head

        @fc.register_flop_formula(ops.temporal_attention_forward, get_raw=True)
        def _kernel_fwd(qkv, bias, frames, heads, *args, **kwargs):
            shape = sdpa_shape(qkv.shape, frames, heads)
            return fc.sdpa_flop_count(shape, shape, shape)

        @fc.register_flop_formula(ops.temporal_attention_backward, get_raw=True)
        def _kernel_bwd(grad_out, qkv, bias, frames, heads, *args, **kwargs):
            shape = sdpa_shape(qkv.shape, frames, heads)
            return fc.sdpa_backward_flop_count(shape, shape, shape, shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def _fwd(query, key, value, *args, **kwargs):
        return fc.sdpa_flop_count(query.shape, key.shape, value.shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward,
                              get_raw=True)
    def _bwd(grad_out, query, key, value, *args, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# (m, k, n) of the matmuls whose best rate is taken as the peak. One square shape is not enough:
# on a 2-core Intel CPU with AMX 2048^3 bf16 reached 1.98-2.08 TFLOP/s while 8192x768x768 reached
# 2.93 (and the model's own 3x3 convolutions 3.3-3.5), so a square-only peak flattered every ratio.
PEAK_SHAPES = {"cpu": ((2048, 2048, 2048), (4096, 4096, 4096), (8192, 1024, 1024),
                       (8192, 768, 768), (8192, 512, 1024), (4096, 512, 512)),
               "cuda": ((8192, 8192, 8192), (16384, 4096, 4096), (32768, 3072, 3072))}


# (channels, side) of 3x3 convolutions like the fixed config's, at each of its levels (batch 32,
# channels-last): on some CPUs oneDNN's convolutions outrun every matmul shape above (Zen 4: 0.45-0.50
# against 0.39-0.42 TFLOP/s bf16), so the best dense rate this machine reaches is reported beside the peak.
CONV_SHAPES = ((64, 64), (128, 32), (256, 16), (512, 8))


def best_rate(device, cases, rounds=3, seconds=0.05):
    """Best FLOP/s over `cases` [(label, flops, fn)], timed in rounds that alternate the cases (so
    host noise hits all of them). Returns (FLOP/s, label of the case that reached it)."""
    timed = []
    for label, flops, fn in cases:
        for _ in range(2):
            fn()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        timed.append((label, flops, fn, max(2, int(seconds / (time.perf_counter() - start)))))
    best = (0.0, None)
    for _ in range(rounds):
        for label, flops, fn, reps in timed:
            sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            sync(device)
            best = max(best, (flops * reps / (time.perf_counter() - start), label))
    return best


def matmul_peak(device, dtype):
    """The machine's practical matmul peak for this dtype: best rate over PEAK_SHAPES.
    Returns (FLOP/s, (m, k, n) of the shape that reached it)."""
    cases = []
    for m, k, n in PEAK_SHAPES[device.type]:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        cases.append(((m, k, n), 2 * m * k * n, lambda a=a, b=b, out=out: torch.mm(a, b, out=out)))
    return best_rate(device, cases)


def conv_rate(device, dtype, batch=32):
    """Best forward rate of 3x3 convolutions at CONV_SHAPES. Returns (FLOP/s, (channels, side))."""
    cases = []
    for c, side in CONV_SHAPES:
        x = torch.randn(batch, c, side, side, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        w = torch.randn(c, c, 3, 3, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        cases.append(((c, side), 2 * batch * side * side * c * c * 9,
                      lambda x=x, w=w: torch.nn.functional.conv2d(x, w, padding=1)))
    return best_rate(device, cases)


def copy_bandwidth(device, mb=512, reps=5):
    """Achieved bytes/s of a large tensor copy (read + write), the machine's streaming bandwidth."""
    x = torch.empty(mb * 2**20 // 4, device=device)
    x.uniform_()
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * x.numel() * x.element_size() / best


class OperandBytes(TorchDispatchMode):
    """Sums the bytes of every tensor input and output of each aten op it sees that moves data.

    Views are skipped, and so are ops that alias their input without the view flag
    (`_unsafe_view`, which reshapes a matmul result) or only allocate (`new_empty`, ...).
    """

    NO_TRAFFIC = {"_unsafe_view", "alias", "detach", "lift_fresh", "empty", "empty_like",
                  "empty_strided", "new_empty", "new_empty_strided"}

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket.__name__ not in self.NO_TRAFFIC:
            tensors = [t for t in tree_leaves((args, kwargs, out))
                       if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


# Where the step's time goes: aten ops grouped by kind, matched by name prefix in this order.
OP_CLASSES = (
    ("convolution", ("aten::convolution", "aten::mkldnn_convolution", "aten::_convolution")),
    ("matmul", ("aten::mm", "aten::addmm")),
    ("batched matmul", ("aten::bmm", "aten::baddbmm")),
    ("fused attention (SDPA)", ("aten::_scaled_dot_product",)),
    ("temporal attention kernel", ("vdm_cpu::temporal_attention",)),
    ("GroupNorm+SiLU kernel", ("vdm_cpu::gn_silu",)),
    ("linear attention kernel", ("vdm_cpu::linear_attention",)),
    ("layout copies and casts", ("aten::copy_", "aten::clone", "aten::cat", "aten::stack",
                                 "aten::_to_copy", "vdm_cpu::transpose")),
    ("norms", ("aten::native_group_norm", "aten::native_layer_norm")),
    ("softmax", ("aten::_softmax",)),
)
OTHER = "elementwise and the rest"


def op_class(name: str) -> str:
    """Class of a profiler event name (`aten::mm`) or a FlopCounterMode op (`aten.mm`)."""
    for namespace in ("aten", "vdm_cpu"):
        if name.startswith(namespace + "."):
            name = name.replace(".", "::", 1)
    return next((cls for cls, prefixes in OP_CLASSES if name.startswith(prefixes)), OTHER)


def time_breakdown(model, inputs, dtype, device, seconds):
    """One profiled step: {class: [seconds, flops]}, each class's share of the profiled self time
    scaled to the unprofiled step time, and its FLOPs (FlopCounterMode, per op)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(model, inputs, dtype)
        sync(device)
    spent = {}
    for e in prof.key_averages():
        cls = op_class(e.key)
        spent[cls] = spent.get(cls, 0) + (e.self_device_time_total if device.type == "cuda"
                                          else e.self_cpu_time_total)
    total = sum(spent.values())
    with FlopCounterMode(display=False) as counter:
        train_step(model, inputs, dtype)
    flops = {}
    for op, n in counter.get_flop_counts()["Global"].items():
        cls = op_class(str(op))
        flops[cls] = flops.get(cls, 0) + n
    return {c: [seconds * spent.get(c, 0) / total, flops.get(c, 0)] for c in {*spent, *flops}}


def resident_bytes(field="VmRSS"):
    """This process's resident size (VmRSS) or its high-water mark (VmHWM), from /proc/self/status."""
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith(field + ":"))
    return int(kb) * 1024


def reset_resident_peak():
    """Return freed heap pages to the system (glibc malloc_trim), then set VmHWM to the resident size."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(config, device, seed=0):
    from vdm.model import Unet3D
    torch.manual_seed(seed)
    cfg = CONFIGS[config]
    model = Unet3D(**cfg["model"]).to(device).train()
    b, f, s = cfg["batch"], cfg["frames"], cfg["size"]
    x = torch.randn(b, 3, f, s, s, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    cond = torch.randn(b, cfg["text_len"], cfg["model"]["cond_dim"], device=device)
    mask = torch.ones(b, cfg["text_len"], dtype=torch.bool, device=device)
    mask[0, cfg["text_len"] // 2:] = False
    return model, (x, t, cond, mask)


def train_step(model, inputs, dtype):
    x, t, cond, mask = inputs
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(x, t, cond, mask, null_cond_prob=0.1)
        loss = (out.float() - x).square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def worker(case):
    """Time one case; print one JSON line (run in a fresh process)."""
    from vdm.runtime import keep_freed_memory
    if case["keep_memory"]:  # as vdm-train and vdm-sample do on CPU
        keep_freed_memory()
    torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    model, inputs = build(case["config"], device)
    model.gradient_checkpointing = case["ckpt"]
    dtype = DTYPES[case["dtype"]]
    if case.get("kernels_ab"):
        return kernels_ab(model, inputs, dtype, case["steps"])
    flops = None
    if case["count_flops"]:
        from torch.utils.flop_counter import FlopCounterMode
        register_cpu_flash_flops()
        model.gradient_checkpointing = False
        with FlopCounterMode(display=False) as counter:
            train_step(model, inputs, torch.float32)
        flops = counter.get_total_flops()
        model.gradient_checkpointing = case["ckpt"]
    compile_s = None
    if case.get("compile"):  # Inductor: fused kernels; the first step compiles
        step_model = torch.compile(model)
        start = time.perf_counter()
        train_step(step_model, inputs, dtype)
        compile_s = time.perf_counter() - start
        model, counted = step_model, None  # operand bytes are counted in eager cases only
    else:
        with OperandBytes() as counted:
            train_step(model, inputs, dtype)  # also the warm-up: allocator, oneDNN primitive caches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        # Gradients are freed (zero_grad set_to_none) and trimmed back to the system, so the
        # resident size now is the model and inputs; the steps' peak is measured above it.
        reset_resident_peak()
        base = resident_bytes()
    times = []
    for _ in range(case["steps"]):
        sync(device)
        start = time.perf_counter()
        train_step(model, inputs, dtype)
        sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resident_bytes("VmHWM") - base
    breakdown = None
    if case.get("breakdown"):
        if case["ckpt"] or case.get("compile"):
            raise ValueError("the breakdown is for eager steps without checkpointing")
        register_cpu_flash_flops()
        breakdown = time_breakdown(model, inputs, dtype, device, min(times))
    print(json.dumps(dict(case, seconds=min(times), peak_bytes=peak, flops=flops, breakdown=breakdown,
                          operand_bytes=counted and counted.bytes, compile_s=compile_s)))


def kernels_ab(model, inputs, dtype, pairs):
    """vdm's fused CPU kernels on vs off (the PyTorch path), alternating steps on one model and
    input so that both see the same host; prints the best step of each as JSON."""
    from vdm.model import cpu_kernels
    if not cpu_kernels.available():
        raise RuntimeError("the vdm CPU kernels did not build here")
    times = {True: [], False: []}
    for i in range(pairs + 1):  # the first pair warms both paths up
        for on in (True, False):
            cpu_kernels._state["ok"] = on
            start = time.perf_counter()
            train_step(model, inputs, dtype)
            if i:
                times[on].append(time.perf_counter() - start)
    print(json.dumps(dict(on=min(times[True]), off=min(times[False]))))


def run_case(case):
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default="tiny,fixed")
    parser.add_argument("--full", action="store_true", help="CPU: 16 frames for `fixed`")
    parser.add_argument("--frames", type=int, help="override the fixed config's frame count")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (min taken)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the last config's bf16 step under torch.compile")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        case = json.loads(args.worker)
        CONFIGS["fixed"]["frames"] = case["fixed_frames"]
        return worker(case)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fixed_frames = args.frames or (16 if args.full or device.type == "cuda" else 4)
    CONFIGS["fixed"]["frames"] = fixed_frames
    peaks = {name: matmul_peak(device, dt) for name, dt in DTYPES.items()}
    bandwidth = copy_bandwidth(device)
    load = os.getloadavg()[0]
    rows = []
    for config in args.configs.split(","):
        for i, (dtype, ckpt) in enumerate([(d, c) for d in DTYPES for c in (False, True)]):
            case = dict(config=config, dtype=dtype, ckpt=ckpt, device=args.device,
                        threads=args.threads, steps=args.steps, count_flops=i == 0,
                        fixed_frames=fixed_frames, keep_memory=True,
                        breakdown=config == "fixed" and dtype == "bf16" and not ckpt)
            rows.append(run_case(case))
            print(f"  done {config} {dtype} ckpt={ckpt}: {rows[-1]['seconds']:.2f} s/step",
                  file=sys.stderr, flush=True)
        flops = rows[-4]["flops"]
        for row in rows[-4:]:
            row["flops"] = flops
    if device.type == "cpu":  # the last config's bf16 step with glibc's default: unmap large blocks
        default_malloc = run_case(dict(rows[-2], keep_memory=False, count_flops=False,
                                       breakdown=False))
        kernels = run_case(dict(rows[-2], count_flops=False, breakdown=False, kernels_ab=True))
    compiled = run_case(dict(rows[-2], count_flops=False, compile=True, breakdown=False)) \
        if args.compile else None
    peaks_after = {name: matmul_peak(device, dt) for name, dt in DTYPES.items()}
    peak_shapes = {k: max(peaks[k], peaks_after[k])[1] for k in peaks}
    peaks = {k: max(peaks[k], peaks_after[k])[0] for k in peaks}
    conv = conv_rate(device, DTYPES["bf16"])
    bandwidth = max(bandwidth, copy_bandwidth(device))
    report(rows, peaks, peak_shapes, conv, bandwidth, device, args, fixed_frames, load,
           os.getloadavg()[0])
    if device.type == "cpu":
        kept = rows[-2]  # the case default_malloc repeats
        print(f"  {kept['config']}: keeping freed memory (vdm.runtime.keep_freed_memory) vs glibc's default: "
              f"{default_malloc['seconds']:.3f} -> {kept['seconds']:.3f} s/step, "
              f"{default_malloc['seconds'] / kept['seconds']:.2f}x")
        print(f"  {kept['config']}: vdm's fused CPU kernels (vdm/model/csrc) on vs off, alternating "
              f"bf16 steps: {kernels['off']:.3f} -> {kernels['on']:.3f} s/step, "
              f"{kernels['off'] / kernels['on']:.2f}x")
    if compiled:
        eager = rows[-2]
        print(f"  {eager['config']}: torch.compile bf16 step {compiled['seconds']:.3f} s vs eager "
              f"{eager['seconds']:.3f} s ({eager['seconds'] / compiled['seconds']:.2f}x), "
              f"{100 * eager['flops'] / compiled['seconds'] / peaks['bf16']:.1f}% of the bf16 matmul peak; "
              f"compiling took {compiled['compile_s']:.0f} s")


def report(rows, peaks, peak_shapes, conv, bandwidth, device, args, fixed_frames, load_before,
           load_after):
    print(f"\nUnet3D fwd+bwd on {device.type} ({args.threads} threads); fixed config has "
          f"{fixed_frames} frames; load average {load_before:.1f} -> {load_after:.1f}")
    shape = {k: "x".join(map(str, v)) for k, v in peak_shapes.items()}
    print(f"matmul peak (best of {len(PEAK_SHAPES[device.type])} shapes): fp32 "
          f"{peaks['fp32'] / 1e12:.3f} TFLOP/s at {shape['fp32']}, bf16 {peaks['bf16'] / 1e12:.3f} "
          f"TFLOP/s at {shape['bf16']}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"bf16 3x3 convolution forward (best of {len(CONV_SHAPES)} levels): {conv[0] / 1e12:.3f} TFLOP/s at "
          f"{conv[1][0]} channels {conv[1][1]}x{conv[1][1]}, {conv[0] / peaks['bf16']:.2f}x the bf16 matmul peak")
    head = f"{'config':6} {'dtype':5} {'ckpt':5} {'s/step':>8} {'peak MB':>9} " \
           f"{'GFLOP':>8} {'TFLOP/s':>8} {'% peak':>7} {'GB ops':>7} {'roof s':>7} {'ceiling':>7}"
    print(head)
    print("-" * len(head))
    by = {}
    for r in rows:
        rate = r["flops"] / r["seconds"]
        r["fraction"] = rate / peaks[r["dtype"]]
        compute_s = r["flops"] / peaks[r["dtype"]]
        r["roofline_s"] = max(compute_s, r["operand_bytes"] / bandwidth)
        r["ceiling"] = compute_s / r["roofline_s"]
        by[(r["config"], r["dtype"], r["ckpt"])] = r
        print(f"{r['config']:6} {r['dtype']:5} {str(r['ckpt']):5} {r['seconds']:8.3f} "
              f"{r['peak_bytes'] / 2**20:9.1f} {r['flops'] / 1e9:8.1f} {rate / 1e12:8.3f} "
              f"{100 * r['fraction']:6.1f}% {r['operand_bytes'] / 1e9:7.2f} {r['roofline_s']:7.3f} "
              f"{100 * r['ceiling']:6.1f}%")
    print("GB ops: operand bytes of the step's aten ops; roof s: max(FLOPs / matmul peak, GB ops / "
          "bandwidth); ceiling: the % of peak that roofline time allows")
    print("ratios:")
    for config in dict.fromkeys(r["config"] for r in rows):
        fp32, bf16 = by[(config, "fp32", False)], by[(config, "bf16", False)]
        ck = by[(config, "bf16", True)]
        print(f"  {config}: bf16 speed-up over fp32 {fp32['seconds'] / bf16['seconds']:.2f}x; "
              f"checkpointing (bf16) time x{ck['seconds'] / bf16['seconds']:.2f}, "
              f"peak memory x{ck['peak_bytes'] / max(bf16['peak_bytes'], 1):.2f}")
    fixed = by.get(("fixed", "bf16", False))
    if fixed and fixed.get("breakdown"):
        print_breakdown(fixed, peaks["bf16"])
    if fixed:
        print(f"summary: fixed config bf16 fwd+bwd reaches {100 * fixed['fraction']:.1f}% of the "
              f"measured bf16 matmul peak; streaming its operand bytes once at the "
              f"measured bandwidth caps this op sequence at {100 * fixed['ceiling']:.1f}%, and the step "
              f"runs at {fixed['roofline_s'] / fixed['seconds']:.0%} of that roofline")
        dense = max(peaks["bf16"], conv[0])
        print(f"  against the best dense rate measured here ({dense / 1e12:.3f} TFLOP/s, the higher of the "
              f"matmul peak and the 3x3 convolutions): {100 * fixed['flops'] / fixed['seconds'] / dense:.1f}%")


def print_breakdown(row, peak, reference=0.35):
    """The fixed bf16 step by op class, and what the FLOP-carrying classes alone imply for MFU."""
    parts = sorted(row["breakdown"].items(), key=lambda kv: -kv[1][0])
    print(f"where the fixed bf16 step's {row['seconds']:.3f} s go (one profiled step, shares scaled "
          f"to the unprofiled time):")
    print(f"  {'op class':26} {'s':>7} {'share':>6} {'GFLOP':>7} {'TFLOP/s':>8} {'% peak':>7}")
    for cls, (sec, flops) in parts:
        rate = f"{flops / sec / 1e12:8.3f} {100 * flops / sec / peak:6.1f}%" if flops and sec else ""
        print(f"  {cls:26} {sec:7.3f} {100 * sec / row['seconds']:5.1f}% {flops / 1e9:7.1f} {rate}")
    dense_s = sum(sec for cls, (sec, _) in parts if cls in ("convolution", "matmul"))
    budget = row["flops"] / (reference * peak)
    print(f"  convolutions and matmuls alone take {dense_s:.3f} s at the rates they reach here; "
          f"{100 * reference:.0f}% of the bf16 peak needs the whole step in {budget:.3f} s")


if __name__ == "__main__":
    main()
