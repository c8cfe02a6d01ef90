"""Write the example planning problems in plans/ from the EdgePipe board profiles.

    python plans/make_problems.py [--profiles plans/profiles/edge-board-profiles.json] [--out plans/]

Source: per-sublayer times and memory of ViT-Base/Large measured by PipeEdge's authors on
the EdgePipe testbed boards (MinnowBoard E3845 2 GB, RCC-VE C2558 8 GB), microbatch 8,
fp32 (the JSON's "units" field). How the problems are derived (docs/planner.md repeats it):

- Units. 4 sublayers per block; a half-block is sublayers 0+1 (attention) or 2+3 (MLP),
  a block all four; at ``sublayer`` granularity (ViT-Base/Large only; bench/planner.py's
  distinct-device clusters) each sublayer is a unit and its output is PipeEdge's
  ``parameters_out`` (the context and the MLP hidden layer travel with the residual). The patch embedding is folded into sublayer 0 of block 0: we split it
  off as the ``embed`` unit with time = that sublayer minus the median sublayer 0 of the
  other blocks (clamped at 0). The head is not profiled: ``head`` gets 0 s (a LayerNorm
  and one matrix-vector product per image; the last sublayer's small excess over the
  other fc2 sublayers is within measurement noise and stays there).
- ViT-Huge/14 (not in the data): each sublayer kind's median ViT-Large time is scaled by
  the FLOP ratio of that kind (qkv + attention: 3ND^2 + 2N^2D, projection: ND^2, fc1 and
  fc2: 4ND^2; N tokens, D width), the embedding by the patch-projection FLOP ratio, and
  memory by the parameter ratio (D_H / D_L)^2.
- param_bytes: the measured resident-memory growth of the sublayers (the JSON's mem_MB,
  PipeEdge's own memory figure, ~2.4x the fp32 weights) for blocks; the fp32 weights for
  embed and head. work_bytes: the largest activation inside the unit (qkv + attention
  scores, or the MLP hidden layer). out_bytes: tokens x width x 4 B x microbatch.
- Boards: MinnowBoard 2 GiB, RCC-VE 8 GiB, 300 MB reserved for the runtime on each.
- Links (the paper throttles each board's one interface to 30 Mbps, RCC-VE, or 10 Mbps,
  MinnowBoard): a NIC per board (``nic_mbps``: a board feeding three replicas shares its
  uplink), and the pairs at the slower end's rate: RCC-VE <-> RCC-VE 30 Mbps, anything
  touching a MinnowBoard 10 Mbps, client <-> RCC-VE 30 Mbps, 1 ms each.
  The slow-pair problem adds 5 Mbps links between four pairs of RCC-VE boards.
- LLM decoding (``edgepipe-tinyllama-decode``): TinyLlama-1.1B (22 layers x 2048, 4 GB of
  fp32 weights: no MinnowBoard holds it, nor one RCC-VE beside its caches) generating on the
  same 16 boards: each unit timed on one decode step (``profiling.profile_decode``: 8
  sequences, one new token each, 512 tokens cached) on this project's machine at 1 thread
  (``profiles/host-tinyllama-decode.json``), scaled to each board by how much slower the board
  is than that thread on ViT-Large per sample (``testbed-edgepipe.derivation.json``: board
  seconds / 8 over the host's one-thread seconds at microbatch 1; 2.09x RCC-VE, 2.59x
  MinnowBoard: the assumption is that a decode step slows down on the boards as ViT compute
  does, which a memory-bound step need not). Every layer keeps the KV caches of 64 sequences
  of 512 tokens (``cache_bytes``); no replication (a sequence's cache lives on one replica).
  The head's stage sends each row's token (8 bytes: it picks it, greedy or sampled), not its
  logits (1,024,000 bytes a step, 0.27 s on a 30 Mbps link; ``wire.gen_out_bytes``).
- Home cluster: a laptop (RCC-VE times / 5, 16 GB, 4 GB reserved: an assumption) running
  the client too, and two Raspberry-Pi-4-class boards (MinnowBoard times, 4 GB, 400 MB
  reserved); Wi-Fi 50 Mbps 3 ms between the laptop and the boards, Ethernet 940 Mbps
  0.3 ms between the boards, loopback 10 Gbps for laptop <-> client.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from edgezmq.protocol.wire import gen_out_bytes

HERE = Path(__file__).resolve().parent
DEFAULT_PROFILES = HERE / "profiles" / "edge-board-profiles.json"  # in the repo: the test regenerates from it
MICROBATCH = 8
FP32 = 4
IMAGE_FLOATS = 3 * 224 * 224
CLASSES = 1000
MB = 1e6
GIB = 1 << 30
RESERVED = 300_000_000
MINNOW, RCC = "Minnowboard-E3845", "RCC-VE-C2000"
NIC_MBPS = {RCC: 30, MINNOW: 10}  # the EdgePipe testbed's per-device tc limits
DECODE_PROFILE = HERE / "profiles" / "host-tinyllama-decode.json"
DERIVATION = HERE / "testbed-edgepipe.derivation.json"
BOARD_MICROBATCH = 8  # the board profiles' (edge-board-profiles.json)
LLM_SEQUENCES = 64

# name, timm name, data key (None: derived), tokens N, width D, heads, blocks, patch
ARCH = {
    "vit-base": ("vit_base_patch16_224", "google/vit-base-patch16-224", 197, 768, 12, 12, 16),
    "vit-large": ("vit_large_patch16_224", "google/vit-large-patch16-224", 197, 1024, 16, 24, 16),
    "vit-huge": ("vit_huge_patch14_224", None, 257, 1280, 16, 32, 14),
}
EMBED_PARAMS = {"vit-base": 742_656, "vit-large": 990_208, "vit-huge": 1_084_160}   # timm, fp32 count
HEAD_PARAMS = {"vit-base": 770_536, "vit-large": 1_027_048, "vit-huge": 1_283_560}   # norm + 1000-way head


def _sublayer_flops(n: int, d: int) -> list[float]:
    return [3 * n * d * d + 2 * n * n * d, n * d * d, 4 * n * d * d, 4 * n * d * d]


def sublayers(data: dict[str, Any], arch: str, board: str) -> tuple[float, list[float], float, list[float]]:
    """(embed time, per-sublayer times, head time, per-sublayer memory MB) for one board."""
    _, key, n, d, _, blocks, patch = ARCH[arch]
    if key is None:   # derived from ViT-Large by FLOP ratios
        e_l, t_l, _h, m_l = sublayers(data, "vit-large", board)
        _, _, n_l, d_l, _, _, p_l = ARCH["vit-large"]
        f_h, f_l = _sublayer_flops(n, d), _sublayer_flops(n_l, d_l)
        kinds = [statistics.median(t_l[j::4]) * f_h[j] / f_l[j] for j in range(4)]
        mems = [statistics.median(m_l[j::4]) * (d / d_l) ** 2 for j in range(4)]
        embed_ratio = ((n - 1) * 3 * patch * patch * d) / ((n_l - 1) * 3 * p_l * p_l * d_l)
        return e_l * embed_ratio, kinds * blocks, 0.0, mems * blocks
    model = data["models"][key]
    t = list(model["time_s"][board])
    mem = list(model["mem_MB"])
    embed = min(max(t[0] - statistics.median(t[4::4]), 0.0), t[0])
    t[0] -= embed
    return embed, t, 0.0, mem


def _sublayer_out_bytes(data: dict[str, Any], arch: str) -> list[int]:
    """Bytes of one microbatch leaving each sublayer: PipeEdge's ``parameters_out`` (floats
    per sample; the attention context and the MLP hidden layer travel with the residual)."""
    key = ARCH[arch][1]
    if key is None:
        raise ValueError(f"{arch}: no sublayer profile (derived models have half-blocks and blocks only)")
    return [n * FP32 * MICROBATCH for n in data["models"][key]["parameters_out"]]


def units(data: dict[str, Any], arch: str, granularity: str) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """The unit chain and each board's unit times."""
    _, _, n, d, heads, blocks, _ = ARCH[arch]
    act = n * d * FP32 * MICROBATCH
    attn_work = (3 * n * d + heads * n * n) * FP32 * MICROBATCH
    mlp_work = 4 * n * d * FP32 * MICROBATCH
    per = {"block": 4, "half": 2, "sublayer": 1}[granularity]
    times: dict[str, list[float]] = {}
    mems: list[float] = []
    for board in (MINNOW, RCC):
        embed, t, head, mem = sublayers(data, arch, board)
        grouped = [sum(t[i:i + per]) for i in range(0, len(t), per)]
        times[board] = [round(x, 6) for x in [embed, *grouped, head]]
        mems = [sum(mem[i:i + per]) for i in range(0, len(mem), per)]
    chain = [{"name": "embed", "out_bytes": act, "param_bytes": EMBED_PARAMS[arch] * FP32,
              "work_bytes": act}]
    outs = _sublayer_out_bytes(data, arch) if granularity == "sublayer" else None
    for i in range(blocks):
        if granularity == "block":
            names, works = [f"blocks.{i}"], [max(attn_work, mlp_work)]
        elif granularity == "half":
            names, works = [f"blocks.{i}.attn", f"blocks.{i}.mlp"], [attn_work, mlp_work]
        else:   # edgezmq.model.chain's sublayer units: context, projection, fc1, fc2
            names = [f"blocks.{i}.attn", f"blocks.{i}.attn.proj", f"blocks.{i}.mlp", f"blocks.{i}.mlp.fc2"]
            works = [attn_work, act, mlp_work, mlp_work]
        for name, work in zip(names, works):
            j = len(chain) - 1
            chain.append({"name": name, "out_bytes": act if outs is None else outs[j],
                          "param_bytes": round(mems[j] * MB), "work_bytes": work})
    chain.append({"name": "head", "out_bytes": CLASSES * FP32 * MICROBATCH,
                  "param_bytes": HEAD_PARAMS[arch] * FP32, "work_bytes": (d + CLASSES) * FP32 * MICROBATCH})
    return chain, times


def model_section(data: dict[str, Any], arch: str, granularity: str) -> tuple[dict[str, Any], dict[str, list[float]]]:
    chain, times = units(data, arch, granularity)
    timm_name = ARCH[arch][0]
    kwargs = {"num_classes": CLASSES} if arch == "vit-huge" else {}
    return ({"name": timm_name, "granularity": granularity, "microbatch": MICROBATCH, "dtype": "float32",
             "kwargs": kwargs, "input_bytes": IMAGE_FLOATS * FP32 * MICROBATCH, "units": chain}, times)


def edgepipe(data: dict[str, Any], arch: str, granularity: str, *, slow_pairs: int = 0) -> dict[str, Any]:
    """The EdgePipe testbed: 8 MinnowBoards + 8 RCC-VE boards (module doc for the links)."""
    model, times = model_section(data, arch, granularity)
    devices = [{"name": f"rcc-{i}", "type": "rcc-ve"} for i in range(1, 9)]
    devices += [{"name": f"mb-{i}", "type": "minnowboard"} for i in range(1, 9)]
    overrides = [
        {"a": "rcc-ve", "b": "rcc-ve", "mbps": 30, "latency_ms": 1},
        {"a": "client", "b": "rcc-ve", "mbps": 30, "latency_ms": 1},
    ]
    for i in range(slow_pairs):
        overrides.append({"a": f"rcc-{2 * i + 1}", "b": f"rcc-{2 * i + 2}", "mbps": 5, "latency_ms": 2})
    return {
        "model": model,
        "device_types": {
            # the paper's tc limits are per device (one interface): a NIC each, shared by its links
            "rcc-ve": {"memory_bytes": 8 * GIB, "reserved_bytes": RESERVED, "unit_times_s": times[RCC],
                       "nic_mbps": NIC_MBPS[RCC]},
            "minnowboard": {"memory_bytes": 2 * GIB, "reserved_bytes": RESERVED, "unit_times_s": times[MINNOW],
                            "nic_mbps": NIC_MBPS[MINNOW]},
        },
        "devices": devices,
        "links": {"default": {"mbps": 10, "latency_ms": 1}, "overrides": overrides},
        "options": {"replication": True, "buffers": 2},
    }


def llm_edgepipe(data: dict[str, Any], arch: str, granularity: str) -> dict[str, Any]:
    """TinyLlama decoding on the EdgePipe testbed (module doc)."""
    prof = json.loads(DECODE_PROFILE.read_text())
    der = json.loads(DERIVATION.read_text())
    host = der["host_one_thread_s"] / der["microbatch"]  # this machine's thread, per sample
    scale = {t: der["board_s"][t] / BOARD_MICROBATCH / host for t in (RCC, MINNOW)}
    cached = LLM_SEQUENCES * int(prof["context"])
    units = [{"name": u["name"], "out_bytes": int(u["out_bytes"]), "param_bytes": int(u["param_bytes"]),
              "work_bytes": int(u["work_bytes"]), "cache_bytes": cached * int(u["cache_bytes_per_token"])}
             for u in prof["units"]]
    # the last stage sends each row's token, not its logits (gen.pick, greedy or sampled)
    units[-1]["out_bytes"] = gen_out_bytes(int(prof["microbatch"]), units[-1]["out_bytes"], "argmax")
    times = {t: [round(float(u["time_s"]) * scale[t], 6) for u in prof["units"]] for t in (RCC, MINNOW)}
    problem = edgepipe(data, "vit-large", "block")
    problem["model"] = {"name": prof["model"], "microbatch": int(prof["microbatch"]), "granularity": "block",
                        "kwargs": prof["kwargs"], "input_bytes": int(prof["input_bytes"]), "units": units}
    problem["device_types"]["rcc-ve"]["unit_times_s"] = times[RCC]
    problem["device_types"]["minnowboard"]["unit_times_s"] = times[MINNOW]
    problem["options"]["replication"] = False
    return problem


def home(data: dict[str, Any], arch: str, granularity: str) -> dict[str, Any]:
    """A laptop and two Raspberry-Pi-class boards on Wi-Fi and Ethernet (module doc)."""
    model, times = model_section(data, arch, granularity)
    return {
        "model": model,
        "device_types": {
            "laptop": {"memory_bytes": 16 * GIB, "reserved_bytes": 4 * GIB,
                       "unit_times_s": [round(x / 5, 6) for x in times[RCC]]},
            "rpi4": {"memory_bytes": 4 * GIB, "reserved_bytes": 400_000_000, "unit_times_s": times[MINNOW]},
        },
        "devices": [{"name": "laptop", "type": "laptop"}, {"name": "pi-1", "type": "rpi4"},
                    {"name": "pi-2", "type": "rpi4"}],
        "links": {"default": {"mbps": 50, "latency_ms": 3},
                  "overrides": [{"a": "pi-1", "b": "pi-2", "mbps": 940, "latency_ms": 0.3},
                                {"a": "client", "b": "laptop", "mbps": 10000, "latency_ms": 0.05}]},
        "options": {"replication": True, "buffers": 2},
    }


PROBLEMS = {
    **{f"edgepipe-{a}-{g}": (edgepipe, a, g, {}) for a in ARCH for g in ("block", "half")},
    "edgepipe-slowpairs-vit-large-half": (edgepipe, "vit-large", "half", {"slow_pairs": 4}),
    "home-vit-large-half": (home, "vit-large", "half", {}),
    "edgepipe-tinyllama-decode": (llm_edgepipe, "tinyllama", "block", {}),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", type=Path, default=DEFAULT_PROFILES)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    data = json.loads(args.profiles.read_text())
    for name, (build, arch, gran, kw) in PROBLEMS.items():
        problem = build(data, arch, gran, **kw)
        path = args.out / f"{name}.problem.yaml"
        header = (f"# {name}: generated by plans/make_problems.py from {args.profiles.name}\n"
                  f"# (see that script's docstring for every derivation and assumption)\n")
        path.write_text(header + yaml.safe_dump(problem, sort_keys=False, default_flow_style=None, width=100))
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
