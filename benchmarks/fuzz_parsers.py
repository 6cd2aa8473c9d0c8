"""A bounded, seeded mutation fuzzer for every parser of untrusted bytes in qiotwisted.

The targets and their properties are ``tests/test_fuzz.py``'s oracles
(``check_walker``, ``check_ws``, ``check_handshake``, ``check_creds``...): only
the documented error may escape, errors are sticky and point inside the
input, and the outcome does not depend on the chunking.  This loop runs them
for ``--seconds`` on inputs made by ``random.Random(--seed)``: mutations
(bit flips, boundary values, deletions, insertions, splices, truncations) of
a corpus of valid inputs, in random chunkings.

Corpus: the synthetic 7.2 streams of ``tests/test_wire.py``, valid websocket
frames and upgrade requests, the test PKI's PEM files; with ``--qemu`` (the
default when ``qemu-system-x86_64`` is installed) also REAL streams captured
from QEMU 7.2 at start-up: a complete main stream of a zero-RAM guest (real
device sections and VM description) and prefixes of the main and multifd
channels of a random-RAM multifd migration.

Every failing input is written to ``--out`` (first 20 per target) and the run
exits 1.  Printed: examples run and failures per target.

    python benchmarks/fuzz_parsers.py --seconds 120
    python benchmarks/fuzz_parsers.py --seconds 30 --seed 7 --no-qemu --targets main,multifd
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qiotwisted.channel._wsproto import Role
from qiotwisted.migration.wire import MultifdInit, MultifdStreamWalker
from tests import test_fuzz as tf
from tests.pki import get_test_pki


def random_ops(rng: random.Random, n_max: int = 6) -> list[tf.Op]:
    return [
        (
            rng.randrange(tf.N_OPS),
            rng.randrange(1 << 24),
            rng.randrange(256),
            rng.randrange(1 << 20),
        )
        for _ in range(rng.randint(1, n_max))
    ]


def random_cuts(rng: random.Random, size: int) -> list[int]:
    style = rng.randrange(4)
    if style == 0:
        return []
    if style == 1:
        return [1] * min(size, 2000)
    top = rng.choice([8, 64, 1500, 70000])
    return [rng.randint(1, top) for _ in range(rng.randint(1, 40))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("fuzz-failures"))
    p.add_argument(
        "--qemu",
        dest="qemu",
        action="store_true",
        default=shutil.which("qemu-system-x86_64") is not None,
    )
    p.add_argument("--no-qemu", dest="qemu", action="store_false")
    p.add_argument("--targets", default="", help="comma-separated subset of the targets")
    a = p.parse_args()
    # Some corrupt certificates only warn (a non-positive serial): not an error here.
    warnings.simplefilter("ignore")
    rng = random.Random(a.seed)
    tmp = Path(tempfile.mkdtemp(prefix="qiot-fuzz-"))
    pki = get_test_pki(tmp / "pki")
    pem_files = {p.name: p.read_bytes() for p in pki.full_dir.iterdir()}

    mains = [(data, kw) for data, kw in tf.MAIN_BASES]
    mfs = list(tf.MF_BASES)
    real = 0
    if a.qemu:
        t0 = time.monotonic()
        real_mains, real_mfs = tf.capture_qemu_streams(tmp / "qemu")
        mains += [(d, {}) for d in real_mains]
        mfs += real_mfs
        real = len(real_mains) + len(real_mfs)
        print(
            f"corpus: {real} real QEMU 7.2 streams captured in {time.monotonic() - t0:.1f} s "
            f"({', '.join(str(len(d)) for d in real_mains + real_mfs)} bytes)",
            flush=True,
        )
    main_hot = [tf.structural_offsets(d) for d, _ in mains]
    mf_hot = [tf.structural_offsets(d) for d in mfs]
    donors = [d for d, _ in mains] + mfs

    def t_classify() -> tuple[bytes, Callable[[], Any]]:
        head = (
            rng.randbytes(rng.randrange(9))
            if rng.random() < 0.7
            else tf.mutate(b"QEVM\x11\x22\x33\x44", random_ops(rng), ())
        )
        return head, lambda: tf.check_classify(head)

    def t_multifd_init() -> tuple[bytes, Callable[[], Any]]:
        raw = tf.mutate(MultifdInit.build(tf.UUID, rng.randrange(256)), random_ops(rng), mfs)
        return raw, lambda: tf.check_multifd_init(raw)

    def t_main() -> tuple[bytes, Callable[[], Any]]:
        k = rng.randrange(len(mains))
        base, kw = mains[k]
        data = tf.mutate(base, random_ops(rng), donors, main_hot[k])
        cuts = random_cuts(rng, len(data))
        return data, lambda: tf.check_walker(tf._main_maker(kw), data, cuts)

    def t_multifd() -> tuple[bytes, Callable[[], Any]]:
        k = rng.randrange(len(mfs))
        data = tf.mutate(mfs[k], random_ops(rng), donors, mf_hot[k])
        blocks = dict(tf.BLOCKS) if k < len(tf.MF_BASES) and rng.random() < 0.5 else None
        cuts = random_cuts(rng, len(data))
        return data, lambda: tf.check_walker(
            lambda: MultifdStreamWalker(ram_blocks=blocks), data, cuts
        )

    def t_ws() -> tuple[bytes, Callable[[], Any]]:
        role = rng.choice([Role.SERVER, Role.CLIENT])
        base = tf.WS_CLIENT_STREAM if role is Role.SERVER else tf.WS_SERVER_STREAM
        if rng.random() < 0.2:
            data = rng.randbytes(rng.randrange(300))
        else:
            data = tf.mutate(base, random_ops(rng), [tf.WS_CLIENT_STREAM, tf.WS_SERVER_STREAM])
        cuts = random_cuts(rng, len(data))
        return data, lambda: tf.check_ws(role, data, cuts)

    def t_handshake() -> tuple[bytes, Callable[[], Any]]:
        data = tf.mutate(tf.REQUEST, random_ops(rng), [tf.REQUEST, *tf.header_lines, b"\r\n\r\n"])
        cuts = random_cuts(rng, len(data))
        return data, lambda: tf.check_handshake(data, cuts)

    def t_creds() -> tuple[bytes, Callable[[], Any]]:
        files = dict(pem_files)
        target = rng.choice(tf.CRED_FILES)
        base = files.get(target) or files["ca-cert.pem"]
        files[target] = tf.mutate_pem(
            base, random_ops(rng, 3), list(pem_files.values()), rng.random() < 0.6
        )
        endpoint = rng.choice(["server", "client"])
        sanity = rng.random() < 0.7
        return files[target], lambda: tf.check_creds(files, endpoint, sanity_check=sanity)

    targets: dict[str, tuple[int, Callable[[], tuple[bytes, Callable[[], Any]]]]] = {
        "classify": (1, t_classify),
        "multifd-init": (1, t_multifd_init),
        "main": (6, t_main),
        "multifd": (4, t_multifd),
        "websocket": (3, t_ws),
        "ws-handshake": (2, t_handshake),
        "creds": (2, t_creds),
    }
    if a.targets:
        targets = {k: v for k, v in targets.items() if k in a.targets.split(",")}
    names = [n for n, (w, _) in targets.items() for _ in range(w)]
    runs: Counter[str] = Counter()
    fails: Counter[str] = Counter()
    kinds: dict[str, Counter[str]] = {n: Counter() for n in targets}
    deadline = time.monotonic() + a.seconds
    while time.monotonic() < deadline:
        name = rng.choice(names)
        data, check = targets[name][1]()
        runs[name] += 1
        try:
            check()
        except Exception as e:  # any escape is a finding: keep it and go on
            fails[name] += 1
            sig = f"{type(e).__name__}: {str(e)[:120]}"
            kinds[name][sig] += 1
            if fails[name] <= 20:
                a.out.mkdir(parents=True, exist_ok=True)
                stem = a.out / f"{name}-{fails[name]:02d}"
                stem.with_suffix(".bin").write_bytes(data)
                stem.with_suffix(".txt").write_text(traceback.format_exc())
    shutil.rmtree(tmp, ignore_errors=True)
    total = sum(runs.values())
    print(
        f"seed {a.seed}, {a.seconds:g} s, {total} examples, {sum(fails.values())} failures, "
        f"corpus {len(mains)} main + {len(mfs)} multifd streams ({real} real)"
    )
    for name in targets:
        print(f"  {name:13} {runs[name]:8} examples  {fails[name]:4} failures")
        for sig, n in kinds[name].most_common(5):
            print(f"      {n:5} x {sig}")
    if fails:
        print(f"failing inputs in {a.out}/")
    print("RESULT", "ok" if not fails else "FAILED")
    return 1 if fails else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
