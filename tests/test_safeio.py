"""A shared output folder turned against its users: links planted at the names semtrack writes, pipes,
devices and huge files where it reads, and the sweep of what is left behind (semtrack.safeio and its
users: the lock, the ledger, the sidecar, the report)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from semtrack import safeio
from semtrack.hygiene import stale_temporaries
from semtrack.layout import OutputLayout
from semtrack.ledger import LedgerPart
from semtrack.report import main as report_main
from semtrack.report import rebuild
from semtrack.safeio import UnsafeFile, write_text_atomic
from semtrack.shards import FolderBusy, FolderLock, Shard
from semtrack.util import host_tag


@pytest.fixture
def victim(tmp_path):
    """A file of the user's that a planted link points at: it must never change."""
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


def start_record(run: str = "r1") -> dict:
    return {"kind": "start", "run": run, "rank": 0, "time": 1.0, "seq": 1, "world_size": 1, "shard": [0, 1],
            "semtrack_version": "0", "csv_rows": 1, "rows": 1, "assigned": 1, "skipped": 0}


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


# ------------------------------------------------------------------------------ writes
def test_a_link_planted_at_the_lock_is_refused_and_its_target_untouched(tmp_path, victim):
    layout = OutputLayout(tmp_path / "out")
    layout.ledger_dir.mkdir(parents=True)
    layout.lock_file("").symlink_to(victim)
    with pytest.raises(FolderBusy, match="symbolic link"):
        FolderLock(layout, Shard()).acquire()
    assert victim.read_text() == "precious\n"
    layout.lock_file("").unlink()
    os.mkfifo(layout.lock_file(""))  # a FIFO neither blocks nor is locked
    with pytest.raises(FolderBusy, match="FIFO"):
        FolderLock(layout, Shard()).acquire()


def test_a_link_planted_at_the_temporary_or_the_target_name_is_never_followed(tmp_path, victim, monkeypatch):
    target = tmp_path / "failures.csv"
    real = safeio.temporary_path
    planted = [real(target)]
    planted[0].symlink_to(victim)  # the name a writer would pick first, taken by a link
    names = iter([planted[0]])
    monkeypatch.setattr(safeio, "temporary_path", lambda path: next(names, None) or real(path))
    write_text_atomic(target, "row\n")
    assert target.read_text() == "row\n" and not target.is_symlink() and victim.read_text() == "precious\n"
    target.unlink()
    target.symlink_to(victim)  # a link at the target itself is replaced, not written through
    write_text_atomic(target, "again\n")
    assert target.read_text() == "again\n" and not target.is_symlink() and victim.read_text() == "precious\n"
    # the predictable name older versions used does not matter either
    (tmp_path / f"x.csv.tmp-{host_tag()}-{os.getpid()}").symlink_to(victim)
    write_text_atomic(tmp_path / "x.csv", "x\n")
    assert victim.read_text() == "precious\n"


def test_report_files_and_the_ledger_never_write_through_links(tmp_path, victim):
    layout = OutputLayout(tmp_path / "out")
    LedgerPart(layout.ledger_part("r1", 0)).append([start_record()])
    layout.failures.symlink_to(victim)
    rebuild(layout)
    assert not layout.failures.is_symlink() and victim.read_text() == "precious\n"
    layout.ledger_part("r2", 0).symlink_to(victim)
    with pytest.raises(UnsafeFile, match="symbolic link"):
        LedgerPart(layout.ledger_part("r2", 0)).append([start_record("r2")])
    assert victim.read_text() == "precious\n"


def test_the_sweep_takes_planted_links_and_odd_names(tmp_path, victim):
    host, pid = host_tag(), dead_pid()
    (tmp_path / f"a.pkl.tmp-{host}-{os.getpid()}-r0123abcd").symlink_to(victim)  # a link, even "ours"
    (tmp_path / f"b.pkl.tmp-otherhost-{pid}").symlink_to(victim)  # a link, another host
    (tmp_path / f"c\nd.pkl.tmp-{host}-{pid}-r0123abcd").write_text("x")  # a newline in the name
    (tmp_path / f"e.pkl.tmp-otherhost-{pid}").write_text("x")  # a file of another host: kept
    stale = sorted(p.name for p in stale_temporaries([tmp_path]))
    assert stale == sorted([f"a.pkl.tmp-{host}-{os.getpid()}-r0123abcd", f"b.pkl.tmp-otherhost-{pid}",
                            f"c\nd.pkl.tmp-{host}-{pid}-r0123abcd"])


def test_semtrack_report_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    (foreign / "ledger").mkdir(parents=True)
    (foreign / "ledger" / "app.jsonl").write_text(json.dumps({"run": "x", "kind": "video"}) + "\n")
    (foreign / "failures.csv").write_text("theirs\n")
    assert report_main([str(foreign)]) == 2
    assert "not a semtrack output folder" in capsys.readouterr().err
    assert (foreign / "failures.csv").read_text() == "theirs\n" and not (foreign / "run_report.json").exists()
    (foreign / "semtrack_config.json").write_text("{}")  # not a semtrack sidecar either
    assert report_main([str(foreign)]) == 2
    own = OutputLayout(tmp_path / "own")
    LedgerPart(own.ledger_part("r1", 0)).append([start_record()])
    assert report_main([str(own.root)]) == 0 and own.failures.is_file()
