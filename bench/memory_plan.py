"""Memory plan of the paper configs: per-device memory of the compiled train step on simulated
meshes, from XLA's memory analysis, without any weights (m2sa_jax/training/memory_plan.py).

    python -m bench.memory_plan                       # the table of docs/training.md
    python -m bench.memory_plan --configs m2sa_7b --devices 4 --meshes fsdp,data \\
        --remat nothing_saveable,none --json out.json

Each row compiles one train step (batch 2 images per device, up to 3 questions each, the
config's gradient accumulation, bf16 compute, float32 master weights, LoRA) for N fake CPU
devices, in a fresh subprocess per device count (fake devices are fixed at jax import).
Compiling a 7B step on a CPU takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from m2sa_jax import config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"fsdp": dict(data=1, fsdp=-1, tensor=1), "data": dict(data=-1, fsdp=1, tensor=1),
          "fsdp_tensor2": dict(data=1, fsdp=-1, tensor=2)}
HARDWARE = {"A6000 48GB": 48e9, "H100 80GB": 80e9}


def load_config(name: str):
    return config_file.load(os.path.join(ROOT, "configs", f"{name}.py"))


def run_rows(args) -> list[dict]:
    """In this process (fake devices already set): one row per (config, mesh, remat, tokens)."""
    import jax

    from m2sa_jax import sharding
    from m2sa_jax.training import memory_plan

    rows = []
    for name in args.configs.split(","):
        for mesh_name in args.meshes.split(","):
            for remat in args.remat.split(","):
                for tokens in [int(t) for t in args.tokens.split(",")] if args.tokens else [None]:
                    cfg = load_config(name)
                    cfg.model.llm.remat_policy = remat
                    if args.grad_accum:
                        cfg.train.grad_accum = args.grad_accum
                    mesh = sharding.make_mesh(**MESHES[mesh_name])
                    config = memory_plan.model_config(cfg)
                    state = memory_plan.state_bytes_per_device(cfg, config, mesh)
                    m = memory_plan.step_memory(cfg, config, mesh, images_per_device=2,
                                                tokens=tokens)
                    row = dict(config=name, devices=len(jax.devices()), mesh=dict(mesh.shape),
                               mesh_name=mesh_name, remat=remat,
                               tokens=tokens or max(cfg.data.token_buckets),
                               grad_accum=int(cfg.train.grad_accum),
                               state_gb={k: v / memory_plan.GB for k, v in state.items()},
                               **m.row())
                    row["fits"] = {hw: m.peak <= cap for hw, cap in HARDWARE.items()}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| config | devices | mesh | remat | tokens | state (params+LoRA+Adam) GB | "
            "argument GB | output GB | alias GB | temp GB | peak GB | A6000 48 GB | "
            "H100 80 GB | compile s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mesh = "×".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
        st = r["state_gb"]
        lines.append(
            f"| {r['config']} | {r['devices']} | {mesh} | {r['remat']} | {r['tokens']} | "
            f"{st['params']:.2f}+{st['lora']:.3f}+{st['opt_state']:.2f} | "
            f"{r['argument_gb']:.2f} | {r['output_gb']:.2f} | {r['alias_gb']:.2f} | "
            f"{r['temp_gb']:.2f} | {r['peak_gb']:.2f} | "
            f"{'yes' if r['fits']['A6000 48GB'] else 'no'} | "
            f"{'yes' if r['fits']['H100 80GB'] else 'no'} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", default="m2sa_7b,m2sa_llama2_13b")
    ap.add_argument("--devices", default="4,8", help="fake CPU device counts, comma-separated")
    ap.add_argument("--meshes", default="fsdp", help=f"comma-separated, from {sorted(MESHES)}")
    ap.add_argument("--remat", default="nothing_saveable")
    ap.add_argument("--tokens", default="", help="text token bucket(s); default the config's largest")
    ap.add_argument("--grad_accum", type=int, default=0, help="override train.grad_accum")
    ap.add_argument("--json", default="", help="also write the rows here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        run_rows(args)
        return
    rows = []
    for n in args.devices.split(","):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
                   JAX_PLATFORMS="cpu")
        cmd = [sys.executable, "-m", "bench.memory_plan", "--worker", "--configs", args.configs,
               "--meshes", args.meshes, "--remat", args.remat, "--tokens", args.tokens,
               "--grad_accum", str(args.grad_accum)]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"memory plan for {n} devices failed:\n{proc.stderr[-4000:]}")
        rows += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
