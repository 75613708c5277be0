"""StorageClass parameters, volume ids and VDI description metadata (pure)."""

from __future__ import annotations

import pytest

from shared import storage_class, vdi_metadata
from shared import volume_id as vid
from shared.errors import InvalidRequest, VolumeNotFound


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"srUUID": "a", "srsWithTag": "t"}, "mutually exclusive"),
        ({"srUUID": "a", "migrating": "true"}, "migrating needs srsWithTag"),
        ({}, "set parameter srUUID"),
        ({"srsWithTag": "t", "migrating": "maybe"}, 'must be "true" or "false"'),
        ({"srsWithTag": "t", "csi.storage.k8s.io/fstype": "btrfs"}, "not supported: use one of ext4, ext3, xfs"),
        ({"srsWithTag": "t", "srsWithTags": "typo"}, "unknown StorageClass parameter(s) srsWithTags"),
    ],
)
def test_bad_parameters_name_the_field(params: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        storage_class.parse(params)
    assert message in str(info.value)


def test_good_parameters() -> None:
    parsed = storage_class.parse({"srsWithTag": "k8s", "migrating": "TRUE", "csi.storage.k8s.io/fstype": "xfs",
                                  "csi.storage.k8s.io/pvc/name": "data"})
    assert parsed == storage_class.StorageParams(None, "k8s", True, "xfs")
    assert parsed.context() == {"migrating": "true", "srsWithTag": "k8s"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name:pvc-1", vid.VolumeId("name", "pvc-1")),
        ("uuid:0B7E7F52-0A53-4C8F-9F3B-0A4E8B0E6D1A", vid.VolumeId("uuid", "0b7e7f52-0a53-4c8f-9f3b-0a4e8b0e6d1a")),
        ("0b7e7f52-0a53-4c8f-9f3b-0a4e8b0e6d1a", vid.VolumeId("uuid", "0b7e7f52-0a53-4c8f-9f3b-0a4e8b0e6d1a", True)),
    ],
)
def test_volume_id_round_trip(text: str, expected: vid.VolumeId) -> None:
    parsed = vid.parse(text)
    assert parsed == expected
    assert vid.parse(str(parsed)) == parsed
    assert str(parsed) == text.replace("0B7E7F52-0A53-4C8F-9F3B-0A4E8B0E6D1A", "0b7e7f52-0a53-4c8f-9f3b-0a4e8b0e6d1a")


@pytest.mark.parametrize(
    ("migrating", "shared_sr", "by_name"),
    [(True, True, True), (True, False, True), (False, False, True), (False, True, False)],
)
def test_the_handle_rule_is_m4rcsis(migrating: bool, shared_sr: bool, by_name: bool) -> None:
    """m4rCsi sr_selection.go VolumeIDType: by name when migrating or on a local SR, by VDI UUID when fixed shared."""
    assert vid.named_by_disk(migrating=migrating, shared_sr=shared_sr) is by_name


@pytest.mark.parametrize("bad", ["", "x" * 129, "name:" + "a" * 124])
def test_empty_or_oversized_volume_ids_are_invalid_requests(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="volume_id"):
        vid.parse(bad)


@pytest.mark.parametrize(
    "foreign", ["name:", "name:../etc", "uuid:nope", "nfs:thing", "name:a/b", "fake-vol-id", "fake-vol-id-1b4e28ba-2"]
)
def test_ids_of_a_form_this_driver_never_makes_name_no_volume(foreign: str) -> None:
    # csi-sanity sends such ids for volumes that do not exist and expects NOT_FOUND, not INVALID_ARGUMENT
    with pytest.raises(VolumeNotFound, match="names no volume of this driver"):
        vid.parse(foreign)


def test_a_name_that_fits_the_id_is_kept_as_it_is() -> None:
    assert vid.volume_name_for_id("pvc-1") == "pvc-1"
    assert vid.volume_name_for_id("a" * 123) == "a" * 123
    assert len(str(vid.by_name("a" * 123))) == vid.MAX_ID_BYTES


@pytest.mark.parametrize("length", [124, 127, 128])
def test_a_name_too_long_for_its_id_maps_to_a_fitting_name_the_same_every_time(length: int) -> None:
    name = ("pvc-" + "0123456789abcdef" * 8)[:length]
    short = vid.volume_name_for_id(name)
    assert short == vid.volume_name_for_id(name)  # a retried CreateVolume finds the same disk
    assert len(short) == 123 and short.startswith(name[:102] + "-")
    volume_id = str(vid.by_name(short))
    assert len(volume_id.encode()) == vid.MAX_ID_BYTES and vid.parse(volume_id) == vid.by_name(short)
    vid.validate_volume_name(short)  # still a valid volume (and disk) name


def test_the_long_name_rule_is_the_documented_one() -> None:
    # docs and volume_id.py: first 102 bytes, '-', first 20 hex digits of the SHA-256 of the whole name
    name = ("pvc-" + "0123456789abcdef" * 8)[:128]
    assert vid.volume_name_for_id(name) == name[:102] + "-bd0c0f2cb31ac0910272"


def test_long_names_that_share_their_first_bytes_map_to_different_names() -> None:
    a, b = "x" * 127 + "a", "x" * 127 + "b"
    assert vid.volume_name_for_id(a) != vid.volume_name_for_id(b)


VDI = "0f8e4d2c-1a2b-4c3d-8e9f-00aa11bb22cc"


@pytest.mark.parametrize(
    ("migrating", "written", "class_recorded", "shared_sr", "handles"),
    [
        (True, "name", True, False, ["name:pvc-1"]),  # this version: the form it recorded
        (False, "name", True, False, ["name:pvc-1"]),
        (False, "vdi", True, True, [VDI]),
        (True, None, True, True, ["name:pvc-1"]),  # migrating: by name, whoever made it
        (False, None, False, False, ["name:pvc-1"]),  # m4rCsi's fixed volume on a local SR ("csi:info: {}")
        (False, None, False, True, [VDI]),  # m4rCsi's fixed volume on a shared SR: the bare VDI UUID
        (False, None, True, False, ["name:pvc-1", f"uuid:{VDI}"]),  # earlier xo-csi wrote uuid:: both forms
        (False, None, True, True, [VDI, f"uuid:{VDI}"]),
    ],
)
def test_listed_handles_are_the_handles_the_pv_may_carry(migrating: bool, written: str | None, class_recorded: bool,
                                                         shared_sr: bool, handles: list[str]) -> None:
    """external-attacher reconciles VolumeAttachments by looking the PV's handle up in ListVolumes (tests/k8s)."""
    listed = vid.listed_handles("pvc-1", VDI, migrating=migrating, shared_sr=shared_sr, written=written,
                                class_recorded=class_recorded)
    assert listed == handles
    for handle in listed:
        assert str(vid.parse(handle)) == handle


def test_disk_names() -> None:
    assert vid.disk_name("csi-", "pvc-1") == "csi-pvc-1"
    assert vid.temp_disk_name("csi-", "pvc-1") == "csi-temp-pvc-1"
    assert vid.volume_name_of_disk("csi-", "csi-pvc-1") == "pvc-1"
    assert vid.volume_name_of_disk("csi-", "csi-temp-pvc-1") is None
    assert vid.volume_name_of_disk("csi-", "other") is None


def test_metadata_is_m4rcsi_compatible() -> None:
    info = vdi_metadata.StorageInfo(srs_with_tag="k8s", migrating=True)
    assert info.to_description() == 'csi:info: {"migrating":{"enabled":true},"srsWithTag":"k8s"}'
    marked = info.marked("sr-2")
    assert vdi_metadata.parse(marked.to_description()) == marked
    fixed = vdi_metadata.StorageInfo(sr_uuid="sr-1", handle="vdi")
    assert vdi_metadata.parse(fixed.to_description()) == fixed
    clone = vdi_metadata.StorageInfo(srs_with_tag="k8s", migrating=True, handle="name", source_volume="name:pvc-1")
    assert clone.to_description() == ('csi:info: {"migrating":{"enabled":true},"srsWithTag":"k8s","handle":"name",'
                                      '"sourceVolume":"name:pvc-1"}')
    assert vdi_metadata.parse(clone.to_description()) == clone
    assert vdi_metadata.with_mark(clone.to_description(), "sr-2") == clone.marked("sr-2").to_description()
    # an m4rCsi build that wrote toSRUUID
    old = vdi_metadata.parse('csi:info: {"migrating":{"toSRUUID":"sr-9"},"srsWithTag":"k8s"}')
    assert old is not None and old.in_progress_to_sr == "sr-9" and old.migrating
    assert vdi_metadata.parse("csi:info: {not json") is None
    assert vdi_metadata.parse("a user's description") is None
    assert vdi_metadata.parse('csi:info: {"srsWithTag":"k8s"}') == vdi_metadata.StorageInfo("k8s", None, False)


def test_setting_or_clearing_the_mark_keeps_every_other_field() -> None:
    # a description m4rCsi (or a later version) wrote with fields this version does not know: none is lost
    written = 'csi:info: {"migrating":{"enabled":true,"toSRUUID":"sr-9","future":1},"srsWithTag":"k8s","x":[1]}'
    cleared = vdi_metadata.with_mark(written, None)
    assert cleared == 'csi:info: {"migrating":{"enabled":true,"future":1},"srsWithTag":"k8s","x":[1]}'
    marked = vdi_metadata.with_mark(cleared, "sr-2")
    assert marked == ('csi:info: {"migrating":{"enabled":true,"future":1,"inProgressToSRUUID":"sr-2"},'
                      '"srsWithTag":"k8s","x":[1]}')
    assert vdi_metadata.with_mark('csi:info: {"srUUID":"sr-1"}', "sr-2") is None  # not a migrating volume
    assert vdi_metadata.with_mark("a user's description", None) is None
