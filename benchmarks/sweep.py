"""A design-space study run three ways, serially, on embedded Ray and on a two-node Ray cluster: every
point's row equal across the three, and the wall time of embedded Ray (2 workers) against serial.

    python benchmarks/sweep.py                 # 216 points, three runs: about 6 minutes on 2 cores
    python benchmarks/sweep.py --quick         # 14 points, to try it
    python benchmarks/sweep.py --plot docs/    # also the plots of the PIM-GPT study (docs/sweep_*.png)

The study (every time in it modelled, never measured; only the wall times below are measured):
(1) Duplex's Mixtral-like MoE decode layer on ``duplex`` over the Logic-PIM's bandwidth (3.35 to 53.6 TB/s)
    x batch (1 to 128) x experts per token (top-1 to top-8 of 8), optimal placement, analytic cost model:
    120 points;
(2) GPT decode steps on ``pim-gpt`` (PIM-GPT's eight models, GPT-2 small to GPT-3 XL, context 128 and
    512) over the PIM's channel count (2 to 64), with the PIM simulator in placement (``cost_model="sim"``):
    96 points.

(a) runs the points one by one in a process of their own (one that never imports Ray); (b) on Ray embedded here with 2 workers; (c) on a cluster
of two Ray nodes (``ray start --head`` and ``ray start --address``, each its own process, one CPU each)
started here, which the study joins by address. (a) and (b) alternate over blocks of the points (``--blocks``,
a b, b a, ...), as this VM's speed drifts by a third over minutes: run one after the other, the drift was
booked as the speedup (1.19x in one such run whose per-point times showed no loss to Ray). (a) does not run
in this process because Ray initialised in a process, even idle, slowed its points by a fifth (measured). Each run writes its own table; the rows are compared
point by point, leaving out ``compile_s`` and ``worker``. The machine is shared: wall times are noisy.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GPT_MODELS = {"gpt2-small": (12, 768, 12), "gpt2-medium": (24, 1024, 16), "gpt2-large": (36, 1280, 20),
              "gpt2-xl": (48, 1600, 25), "gpt3-small": (12, 768, 12), "gpt3-medium": (24, 1024, 16),
              "gpt3-large": (24, 1536, 16), "gpt3-xl": (24, 2048, 16)}   # PIM-GPT's eight (benchmarks/sim_report.py)
MOE = "hetflow.examples.decode_graphs:build_mixtral_decode_layer"
GPT = f"{Path(__file__).resolve()}:pim_gpt_decode"


def pim_gpt_decode(model: str = "gpt2-small", context: int = 512):
    """One decode step (batch 1) of one of PIM-GPT's GPT models, by name: the builder the study sweeps."""
    from hetflow.examples.decode_graphs import build_gpt2_decode_step
    layers, hidden, heads = GPT_MODELS[model]
    return build_gpt2_decode_step(layers=layers, hidden=hidden, heads=heads, context=context)


def study(quick: bool):
    from hetflow.sweep import grid_points
    bandwidths = ["3.35TB/s", "6.7TB/s", "13.4TB/s", "26.8TB/s", "53.6TB/s"]
    moe = grid_points(MOE, "duplex", {"device.pim.bandwidth": bandwidths[1:3] if quick else bandwidths},
                      {"top_k": [1, 2] if quick else [1, 2, 4, 8]}, batch=[1, 32] if quick else [1, 4, 16, 32, 64, 128],
                      placement="optimal")
    gpt = grid_points(GPT, "pim-gpt", {"device.pim.channels": [4, 16, 64] if quick else [2, 4, 8, 16, 32, 64]},
                      {"model": ["gpt2-small", "gpt3-small"] if quick else list(GPT_MODELS),
                       "context": [512] if quick else [128, 512]}, cost_model="sim")
    return moe + gpt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(temp_dir: str) -> tuple[str, list[subprocess.Popen]]:
    """A head node and a second node on this machine, one CPU each, each a 'ray start --block' process of
    ours (stopped by ending those processes, never 'ray stop', which would end every Ray here)."""
    port = free_port()
    ray_start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus=1",
                 "--object-store-memory=200000000", "--disable-usage-stats"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0"}  # as embedded (hetflow.sweep)
    head = subprocess.Popen(ray_start + ["--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                                         "--include-dashboard=false", f"--temp-dir={temp_dir}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    _wait_for_nodes(address, 1, head)
    second = subprocess.Popen(ray_start + [f"--address={address}", "--node-ip-address=127.0.0.1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_nodes(address, 2, second)
    return address, [second, head]


def _wait_for_nodes(address: str, nodes: int, process: subprocess.Popen, timeout: float = 90.0) -> None:
    probe = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"'ray start' exited with {process.returncode}")
        out = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() and int(out.stdout.split()[-1]) >= nodes:
            return
        time.sleep(1.0)
    raise RuntimeError(f"the Ray cluster at {address} did not reach {nodes} nodes in {timeout:.0f} s")


def stop_cluster(processes: list[subprocess.Popen]) -> None:
    import signal
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def interleaved(points, folder: Path, blocks: int, quick: bool) -> tuple[float, float, float]:
    """(a) and (b) over the same points, block by block, the order alternating (a b, b a, a b, ...): this
    VM's speed drifts by a third over minutes (its host is shared), which two runs one after the other
    would book as a speedup or a loss. (a) runs in a child process that never imports Ray (kept across the
    blocks, as one serial study's process): Ray initialised in a process, even idle, slowed that process's
    points by a fifth here. Ray starts once, as in one study; the CPU its idle processes take during the
    serial blocks is printed. Both tables end up holding every point."""
    import ray
    from hetflow.sweep import connect_ray, run_points
    serial_worker = subprocess.Popen([sys.executable, __file__, "--serial-worker", str(folder), "--blocks",
                                      str(blocks)] + (["--quick"] if quick else []),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    start = time.perf_counter()
    connect_ray(ray, None, 2)              # Ray's own start (a few seconds), timed apart from the study
    ray_start_s = time.perf_counter() - start
    size = -(-len(points) // blocks)
    serial_s = embedded_s = idle_ray_cpu = 0.0

    def ray_cpu() -> float:                # the processes Ray started under this one (raylet, GCS, workers)
        parent, seconds = {}, {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(stat.parent.name)
            parent[pid], seconds[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        def ray_process(pid: int) -> bool:
            while pid > 1:
                pid = parent.get(pid, 0)
                if pid == os.getpid():
                    return True
            return False
        return sum(t for pid, t in seconds.items() if ray_process(pid) and pid != serial_worker.pid)
    try:
        for index in range(blocks):
            block = points[index * size:(index + 1) * size]
            walls = {}
            for engine in (("serial", "ray") if index % 2 == 0 else ("ray", "serial")):
                if engine == "serial":
                    before = ray_cpu()
                    serial_worker.stdin.write(f"{index}\n")
                    serial_worker.stdin.flush()
                    walls[engine] = float(serial_worker.stdout.readline())
                    idle_ray_cpu += ray_cpu() - before
                else:
                    start = time.perf_counter()
                    run_points(block, folder / "embedded.parquet", engine="ray", progress=False)
                    walls[engine] = time.perf_counter() - start
            serial_s += walls["serial"]
            embedded_s += walls["ray"]
            print(f"  block {index + 1}/{blocks} ({len(block)} points): serial {walls['serial']:.1f} s, embedded "
                  f"Ray {walls['ray']:.1f} s ({walls['serial'] / walls['ray']:.2f}x)", flush=True)
    finally:
        ray.shutdown()
        serial_worker.stdin.close()
        serial_worker.wait()
    print(f"(a, serial) {len(points)} points in {serial_s:.1f} s (Ray's idle processes meanwhile: "
          f"{idle_ray_cpu:.1f} s of CPU); (b, embedded Ray, 2 workers) in {embedded_s:.1f} s")
    return serial_s, embedded_s, ray_start_s


def serial_worker(folder: Path, blocks: int, quick: bool) -> None:
    """(a)'s process: reads a block number per line, runs that block serially, prints its wall time."""
    from hetflow.sweep import run_points
    points = study(quick)
    size = -(-len(points) // blocks)
    for line in sys.stdin:
        index = int(line)
        start = time.perf_counter()
        run_points(points[index * size:(index + 1) * size], folder / "serial.parquet", engine="serial",
                   progress=False)
        print(time.perf_counter() - start, flush=True)


def read_table(path: Path) -> list[dict]:
    from hetflow.sweep_table import read_rows
    return read_rows(path)


def run(label: str, points, table: Path, **engine) -> tuple[float, dict]:
    from hetflow.sweep import run_points
    start = time.perf_counter()
    result = run_points(points, table, progress=False, **engine)
    wall = time.perf_counter() - start
    print(f"({label}) {result.summary()}; wall {wall:.1f} s")
    return wall, {r["point"]: r for r in result.rows}


def compare(reference: dict, other: dict, label: str) -> int:
    from hetflow.sweep import equal_rows
    differing = [k for k in reference if k not in other or not equal_rows(reference[k], other[k])]
    print(f"  {label}: {len(reference) - len(differing)}/{len(reference)} points equal to serial")
    for key in differing[:5]:
        print(f"    differs: {key} {reference[key].get('model')}")
    return len(differing)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="14 points instead of 216")
    parser.add_argument("--plot", metavar="DIR", help="write the PIM-GPT study's plots into DIR")
    parser.add_argument("--blocks", type=int, default=4, help="(a) and (b) alternate over this many blocks of "
                        "the points (default 4)")
    parser.add_argument("--keep", metavar="DIR", help="write the tables into DIR (default: a temporary folder)")
    parser.add_argument("--serial-worker", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serial_worker:
        serial_worker(Path(args.serial_worker), args.blocks, args.quick)
        return 0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    folder = Path(args.keep or tempfile.mkdtemp(prefix="hetflow-sweep-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet*"):
        old.unlink()                       # each run computes every point: nothing resumed here
    points = study(args.quick)
    print(f"{len(points)} points: Duplex MoE layer (bandwidth x batch x top-k) and PIM-GPT decode "
          "(channels x model x context); every result modelled, wall times measured (a shared 2-core machine)")
    serial_s, embedded_s, ray_start_s = interleaved(points, folder, args.blocks, args.quick)
    serial = {r["point"]: r for r in read_table(folder / "serial.parquet")}
    embedded = {r["point"]: r for r in read_table(folder / "embedded.parquet")}
    temp_dir = tempfile.mkdtemp(prefix="hetflow-ray-")
    address, processes = start_cluster(temp_dir)
    try:
        cluster_s, cluster = run(f"c, two-node Ray cluster at {address}", points, folder / "cluster.parquet",
                                 engine="ray", address=address)
    finally:
        stop_cluster(processes)
    times = [r["compile_s"] for r in serial.values() if r.get("compile_s")]
    slow = sum(t > 0.1 for t in times)
    print(f"point compile times (serial): median {statistics.median(times) * 1e3:.0f} ms, "
          f"{slow}/{len(times)} over 100 ms, sum {sum(times):.1f} s")
    for label, rows, wall in (("embedded Ray", embedded, embedded_s), ("two-node cluster", cluster, cluster_s)):
        busy = sum(r["compile_s"] for r in rows.values() if r.get("compile_s"))
        print(f"  {label}: sum of point times {busy:.1f} s (serial {sum(times):.1f} s); wall - sum / 2 workers = "
              f"{wall - busy / 2:.1f} s of scheduling and idle workers")
    differing = compare(serial, embedded, "embedded Ray") + compare(serial, cluster, "two-node cluster")
    print(f"wall time: serial {serial_s:.1f} s, embedded Ray (2 workers) {embedded_s:.1f} s, "
          f"two-node cluster {cluster_s:.1f} s")
    print(f"embedded Ray (2 workers) against serial: {serial_s / embedded_s:.2f}x (target 1.7x); with Ray's "
          f"start ({ray_start_s:.1f} s) counted: {serial_s / (embedded_s + ray_start_s):.2f}x; "
          f"cluster against serial: {serial_s / cluster_s:.2f}x")
    if args.plot:
        from hetflow.sweep_plot import plot_table
        out = Path(args.plot)
        out.mkdir(parents=True, exist_ok=True)
        for name, kwargs in (("pareto", dict(cost="device.pim.channels", where={"arg.model": "gpt2-xl"})),
                             ("heatmap", dict(heatmap=("arg.model", "device.pim.channels"), where={"arg.context": 512}))):
            with tempfile.TemporaryDirectory() as scratch:
                for written in plot_table(folder / "serial.parquet", scratch,
                                          where={"platform": "pim-gpt", **kwargs.pop("where")}, **kwargs):
                    target = out / f"sweep_pim_gpt_{name}.png"
                    target.write_bytes(Path(written).read_bytes())
                    print(f"wrote {target}")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
