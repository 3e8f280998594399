"""Hostile uploads against a live stream. Starts `mole-serve serve` on an empty temporary store,
keeps one streaming completion going on the base model, and posts the worst uploads an operator
(or a stolen admin token) can send within the upload limits, one after the other:

- a .tar.gz of 1,000,000 folder entries (a few MB);
- a .zip of 300,000 folder entries;
- a .zip holding a README of 500 MB of zeros next to the adapter files (0.5 MB compressed);
- adapter files whose safetensors holds as many (tiny, misnamed) tensors as the header check lets
  through for SmolLM2-135M at the default limits: 30 layers x 7 modules x 129, all built by `load`.

Reports each upload's status and time, the server's peak memory growth, and the longest gap
between two tokens of the live stream before and while they are posted (target: under 1 s).

    python -m bench.faults --out bench/results/faults.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import secrets
import signal
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import httpx

from bench.common import machine, served, write_json

BLOCK = 512


def tar_gz_of_folders(n: int) -> bytes:
    """A .tar.gz of n empty folder entries named d0000000/ ..., built header by header (a ustar
    header's checksum is the sum of its bytes with the checksum field read as spaces)."""
    import tarfile

    template = tarfile.TarInfo("d0000000/")
    template.type = tarfile.DIRTYPE
    header = bytearray(template.tobuf(tarfile.USTAR_FORMAT))
    header[148:156] = b" " * 8
    name_sum = sum(header[:9])
    base_sum = sum(header) - name_sum
    deflate = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # the gzip wrapper
    out, batch = [], []
    for i in range(n):
        name = b"d%07d/" % i
        header[:9] = name
        header[148:156] = b"%06o\0 " % (base_sum + sum(name))
        batch.append(bytes(header))
        if len(batch) == 4096:
            out.append(deflate.compress(b"".join(batch)))
            batch = []
    out.append(deflate.compress(b"".join(batch) + bytes(2 * BLOCK)))  # the end-of-archive blocks
    out.append(deflate.flush())
    return b"".join(out)


def zip_of_folders(n: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            zf.writestr(f"d{i}/", b"")
    return buf.getvalue()


def zip_of_zeros(mb: int) -> bytes:
    """The adapter's three files (not a valid adapter: it never gets that far) and a README of zeros."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", "{}")
        zf.writestr("card.json", "{}")
        zf.writestr("adapter_model.safetensors", b"")
        with zf.open("README.md", "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(mb):
                f.write(chunk)
    return buf.getvalue()


def many_tensors(n: int) -> list[tuple[str, bytes]]:
    """Adapter files whose weights are n tiny tensors no kind knows (refused once they are built)."""
    import torch
    from safetensors.torch import save

    key = "base_model.model.model.layers.{}.self_attn.q_proj.lora_A.{}.weight"
    tensors = {key.format(i % 30, i): torch.zeros(1) for i in range(n)}
    card = {"name": "many-tensors", "examples": [f"example {i}" for i in range(5)]}
    return [
        ("adapter_config.json", json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}).encode()),
        ("card.json", json.dumps(card).encode()),
        ("adapter_model.safetensors", save(tensors)),
    ]


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def live_stream(http: httpx.AsyncClient, stop: asyncio.Event, stamps: list[list[float]]) -> None:
    """One streaming completion after another until `stop`; stamps gets each one's token arrival times."""
    body = {"model": "auto", "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    while not stop.is_set():
        times: list[float] = []
        stamps.append(times)
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"the live stream was refused: {(await r.aread()).decode()}")
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
                if stop.is_set():
                    break


def longest_gap(stamps: list[list[float]], start: float, end: float) -> float:
    """The longest pause between two tokens of one stream, within [start, end), seconds."""
    gaps = [b - a for times in stamps for a, b in zip(times, times[1:]) if start <= b and a < end]
    return max(gaps, default=float("nan"))


async def measure(
    url: str, token: str, pid: int, posted: dict[str, list[tuple[str, bytes]]], baseline_s: float
) -> dict:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        stop, stamps = asyncio.Event(), []
        stream = asyncio.create_task(live_stream(http, stop, stamps))
        while not stamps or len(stamps[0]) < 5:  # the stream runs
            if stream.done():
                stream.result()  # raises what stopped it
            await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        await asyncio.sleep(baseline_s)
        rss_before = peak_rss_mb(pid)
        uploads, windows, t1 = [], [], time.perf_counter()
        for label, parts in posted.items():
            start = time.perf_counter()
            r = await http.post("/admin/adapters", headers=headers, files=[("files", part) for part in parts])
            end = time.perf_counter()
            windows.append((start, end))
            uploads.append(
                {
                    "archive": label,
                    "bytes": sum(len(data) for _, data in parts),
                    "status": r.status_code,
                    "message": r.json().get("error", {}).get("message"),
                    "seconds": round(end - start, 3),
                }
            )
            await asyncio.sleep(1)  # apart, so a pause this upload caused ends before the next one starts
        await asyncio.sleep(2)  # the tokens that close the last upload's window
        t2 = time.perf_counter()
        stop.set()
        await stream
    for upload, (start, end) in zip(uploads, windows):
        upload["longest_token_gap_s"] = round(longest_gap(stamps, start, end), 3)
    return {
        "uploads": uploads,
        "longest_token_gap_s": {
            "baseline": round(longest_gap(stamps, t0, t1), 3),
            "during_uploads": round(longest_gap(stamps, t1, t2), 3),
        },
        "server_peak_rss_growth_mb": round(peak_rss_mb(pid) - rss_before, 1),
        "tokens_streamed": sum(map(len, stamps)),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folders-tar", type=int, default=1_000_000, help="folder entries of the .tar.gz")
    ap.add_argument("--folders-zip", type=int, default=300_000, help="folder entries of the .zip")
    ap.add_argument("--zeros-mb", type=int, default=500, help="MB of zeros in the README of the last .zip")
    ap.add_argument("--tensors", type=int, default=30 * 7 * 129, help="tensors of the last upload's weights")
    ap.add_argument("--baseline", type=float, default=5, help="seconds of streaming before the first upload")
    ap.add_argument("--out", default="bench/results/faults.json")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    uploads = {  # built before the stream starts: this process's own Python must not delay its reads
        f"tar.gz of {args.folders_tar:,} folders": [("folders.tar.gz", tar_gz_of_folders(args.folders_tar))],
        f"zip of {args.folders_zip:,} folders": [("folders.zip", zip_of_folders(args.folders_zip))],
        f"zip of a {args.zeros_mb} MB README of zeros": [("zeros.zip", zip_of_zeros(args.zeros_mb))],
        f"safetensors of {args.tensors:,} tensors": many_tensors(args.tensors),
    }
    print(
        f"uploads built in {time.perf_counter() - start:.1f} s: "
        + ", ".join(f"{label} {sum(len(data) for _, data in parts):,} B" for label, parts in uploads.items())
    )
    token = secrets.token_hex(8)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` still stops the server below
    with tempfile.TemporaryDirectory(prefix="mole-bench-faults-") as tmp:
        env = {"MOLE_ADMIN_TOKEN": token, "MOLE_ADAPTERS_DIR": str(Path(tmp) / "store")}
        with served(env, Path(tmp) / "server.log") as (url, pid):
            results = asyncio.run(measure(url, token, pid, uploads, args.baseline))
    print("| archive | bytes | status | seconds | longest token gap (s) |")
    print("|---|---|---|---|---|")
    for u in results["uploads"]:
        print(f"| {u['archive']} | {u['bytes']:,} | {u['status']} | {u['seconds']} | {u['longest_token_gap_s']} |")
    gaps = results["longest_token_gap_s"]
    print(
        f"\nlongest gap between tokens of the live stream: {gaps['baseline']} s before the uploads, "
        f"{gaps['during_uploads']} s while they were posted; server peak memory growth "
        f"{results['server_peak_rss_growth_mb']} MB"
    )
    results.update(config=vars(args), machine=machine())
    write_json(args.out, results)
    print(json.dumps(results["longest_token_gap_s"]))
    return results


if __name__ == "__main__":
    main()
