"""``OutcomeLog``: rank 0's per-chunk outcome lines, written and flushed off the loop, in order."""

from __future__ import annotations

import json

from ppstage.stages.outcomes import OutcomeLog


def test_every_line_is_written_in_order_and_close_drains_the_queue(tmp_path):
    path = tmp_path / "chunks.jsonl"
    log = OutcomeLog(path)
    for k in range(500):
        log.write({"chunk_index": k, "outcome": "emitted"})
    log.close()  # returns only once every queued line is on disk
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["chunk_index"] for line in lines] == list(range(500))


def test_a_line_is_visible_to_a_reader_before_close(tmp_path):
    path = tmp_path / "chunks.jsonl"
    log = OutcomeLog(path)
    log.write({"chunk_index": 0})
    log._writer.submit(lambda: None).result(10)  # the writer thread has handled the line
    assert json.loads(path.read_text()) == {"chunk_index": 0}  # flushed, not buffered
    log.close()


def test_a_failing_write_is_counted_and_never_raises_on_the_loop(tmp_path):
    log = OutcomeLog(tmp_path / "chunks.jsonl")
    log._file.close()  # every later write fails (as on a disk that went away)
    log.write({"chunk_index": 0})  # returns: the failure happens in the writer thread
    log.write({"chunk_index": 1})
    log.close()  # drains, closes, logs the loss once; never raises
    assert len(log._failed) == 2 and log._failed[0].startswith("ValueError")
