"""shared/transfer_marks.py and what it promises the rest of the driver: the description of a disk being filled
by a cross-pool move or a clone, its ``~incoming`` name that no volume lookup, listing or cleanup takes for a
volume, and the progress a stream hands to the job's heartbeat (shared/progress.py)."""

from __future__ import annotations

import asyncio

import pytest

from services.migrator.transfer import unsettled
from shared import progress, transfer_marks, vdi_metadata
from shared import volume_id as vid
from shared.progress import ProgressBox, StreamProgress
from shared.transfer_marks import TransferMark
from shared.xo.models import Vdi

INFO = 'csi:info: {"migrating":{"enabled":true},"srsWithTag":"k8s-migrating","handle":"name"}'


def test_a_mark_round_trips_and_completes() -> None:
    mark = TransferMark("copying", "move", "src-uuid", "job-1", INFO)
    text = mark.to_description()
    assert text.startswith("csi:transfer: ")
    assert transfer_marks.parse(text) == mark
    assert not mark.complete and mark.completed().complete
    assert transfer_marks.parse(mark.completed().to_description()) == mark.completed()
    assert vdi_metadata.parse(text) is None  # never read as a volume's csi:info


@pytest.mark.parametrize("description", [
    "", INFO, "csi:transfer: not json", "csi:transfer: []",
    'csi:transfer: {"state":"done","kind":"move","from":"s","job":"j","info":""}',  # unknown state
    'csi:transfer: {"state":"copying","kind":"snapshot","from":"s","job":"j","info":""}',  # unknown kind
    'csi:transfer: {"state":"copying","kind":"clone","from":7,"job":"j","info":""}',
])
def test_anything_else_is_no_readable_mark(description: str) -> None:
    assert transfer_marks.parse(description) is None
    assert transfer_marks.is_marked(description) == description.startswith("csi:transfer: ")


def test_the_incoming_name_is_never_a_volume_nor_a_temporary_disk() -> None:
    name = transfer_marks.incoming_name("csi-pvc-1")
    assert name == "csi-pvc-1~incoming"
    assert vid.volume_name_of_disk("csi-", name) is None  # ListVolumes skips it
    assert not vid.is_volume_name("pvc-1~incoming")  # no CreateVolume can make that name
    assert not name.startswith(vid.temp_disk_name("csi-", ""))  # the temporary-disk cleanup never touches it
    assert vid.volume_name_of_disk("csi-", "csi-pvc-1") == "pvc-1"


async def test_progress_reaches_the_box_of_the_job_whose_task_reports_it() -> None:
    box, other = ProgressBox(), ProgressBox()
    step = StreamProgress(done_bytes=50, total_bytes=200, rate_bps=10.0)

    async def stream() -> None:
        progress.report(step)

    with progress.collecting(box):
        await asyncio.create_task(stream())  # the handler's task inherits the consumer's context
    with progress.collecting(other):
        pass
    progress.report(StreamProgress(done_bytes=1, total_bytes=1, rate_bps=1))  # outside a job: nothing happens
    assert (box.latest, other.latest) == (step, None)
    assert step.fraction == 0.25 and StreamProgress(done_bytes=0, total_bytes=0, rate_bps=0).fraction == 1.0


@pytest.mark.parametrize(("descriptions", "expected"), [
    (['csi:info: {"migrating":{},"srsWithTag":"k8s"}'], False),  # a plain disk: no ~incoming lookup
    ([], False),
    (['csi:info: {"migrating":{"inProgressToSRUUID":"sr-b"},"srsWithTag":"k8s"}'], True),  # a stream may have left T
    ([TransferMark("complete", "move", "v1", "j", "csi:info: {}").to_description()], True),  # T took the name
])
def test_only_a_marked_disk_may_have_left_something_to_settle(descriptions: list[str], expected: bool) -> None:
    vdis = [Vdi.model_validate({"id": f"v{n}", "type": "VDI", "name_label": "csi-a", "name_description": d,
                                "$SR": "sr-a"}) for n, d in enumerate(descriptions)]
    assert unsettled(vdis) is expected
