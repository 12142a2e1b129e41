"""Plugin packages: checked before anything is unpacked (entries that would escape the folder,
symlinks, sizes, the manifest), installed on the plugin queue, compared with the local index."""

from __future__ import annotations

import io
import re
import zipfile

import pytest

from runner import plugins
from tests.flows_support import accepted, task_result

MANIFEST = "version: 1.0.0\ntype: plugin\nauthor: langgenius\nname: translator\nlabel:\n  en_US: Translator\n"
LIMITS = {"max_package": 1_000_000, "max_unpacked": 100_000}


def package(*entries: tuple, manifest: str | None = MANIFEST) -> bytes:
    """A zip of (name, content) or (ZipInfo, content) entries, with manifest.yaml first unless None."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        if manifest is not None:
            archive.writestr("manifest.yaml", manifest)
        for name, content in entries:
            archive.writestr(name, content)  # (a ZipInfo keeps its own compress_type and flags)
    return buffer.getvalue()


def symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = 0o120777 << 16
    return info


@pytest.mark.parametrize("entry, words", [
    ("../evil.py", "escapes the plugin folder"),
    ("tools/../../evil.py", "escapes the plugin folder"),
    ("/etc/evil", "absolute path"),
    ("C:/evil", "absolute path"),
    ("tools\\..\\evil.py", "backslash"),
])
def test_entries_that_would_escape_are_refused_by_name(entry, words):
    with pytest.raises(plugins.PluginPackageError, match=words) as refused:
        plugins.inspect_package(package((entry, "x")), **LIMITS)
    assert refused.value.entry == entry and repr(entry) in str(refused.value)


def test_symlinks_duplicates_sizes_and_manifests_are_checked():
    with pytest.raises(plugins.PluginPackageError, match="symlink") as refused:
        plugins.inspect_package(package((symlink("link"), "/etc/passwd")), **LIMITS)
    assert refused.value.entry == "link"
    with pytest.raises(plugins.PluginPackageError, match="appears twice"):
        plugins.inspect_package(package(("a.py", "1"), ("./a.py", "2")), **LIMITS)
    with pytest.raises(plugins.PluginPackageError, match="unpacks to more than 100000") as refused:
        plugins.inspect_package(package(("big.bin", b"\0" * 200_000)), **LIMITS)  # deflates to a few hundred bytes
    assert refused.value.too_large
    with pytest.raises(plugins.PluginPackageError, match="PLUGIN_MAX_PACKAGE_SIZE"):
        plugins.inspect_package(package(("a", "x")), max_package=10, max_unpacked=100)
    with pytest.raises(plugins.PluginPackageError, match="not a zip"):
        plugins.inspect_package(b"PK\x03\x04 not really", **LIMITS)
    with pytest.raises(plugins.PluginPackageError, match="no manifest"):
        plugins.inspect_package(package(("a.py", "x"), manifest=None), **LIMITS)
    with pytest.raises(plugins.PluginPackageError, match="'version' is required") as refused:
        plugins.inspect_package(package(manifest="name: x\nauthor: me\n"), **LIMITS)
    assert refused.value.field == "version"
    with pytest.raises(plugins.PluginPackageError, match="'name' 'Bad Name'"):
        plugins.inspect_package(package(manifest="name: Bad Name\nversion: 1.0.0\nauthor: me\n"), **LIMITS)
    with pytest.raises(plugins.PluginPackageError, match="'version' 'one'"):
        plugins.inspect_package(package(manifest="name: x\nversion: one\nauthor: me\n"), **LIMITS)
    good = plugins.inspect_package(package(("tools/a.py", "print(1)")), **LIMITS)
    assert (good.name, good.version, good.entries) == ("translator", "1.0.0", 2)


def upload(project, data: bytes, content_type: str = "application/zip"):
    return project.api.request("POST", "/v1/plugins", raw=data, headers={"Content-Type": content_type})


def test_upload_refuses_an_escaping_entry_installs_a_good_package_and_checks_upgrades(project):
    project.up(env={"DIFY_LOCAL_PLUGIN_MAX_UNPACKED_SIZE": "100000", "PLUGIN_MAX_PACKAGE_SIZE": "50000"})
    status, body = upload(project, package(("../evil.py", "import os")))
    assert status == 400 and body["entry"] == "../evil.py" and "'../evil.py'" in body["error"], body
    assert not list(project.dir.parent.rglob("evil.py"))
    status, body = upload(project, package((symlink("link"), "/etc/passwd")))
    assert status == 400 and body["entry"] == "link", body
    status, body = upload(project, package(manifest="name: x\nauthor: me\n"))
    assert status == 400 and body["field"] == "version", body
    status, body = upload(project, package(("big.bin", b"\0" * 200_000)))
    assert status == 413 and "unpacks to more than 100000" in body["error"], body
    status, body = upload(project, b"\0" * 60_000)
    assert status == 413 and "PLUGIN_MAX_PACKAGE_SIZE" in body["error"], body
    status, body = upload(project, package(), content_type="text/plain")
    assert status == 415 and "application/zip" in body["error"], body
    assert project.api.get("/v1/plugins")[1] == {"plugins": []}

    sent = accepted(upload(project, package(("tools/translate.py", "def translate(): ...\n"))))
    assert (sent["name"], sent["version"], sent["task"]) == ("translator", "1.0.0", "install_plugin_task")
    installed = task_result(project, sent["poll"])
    assert installed["path"] == "plugins/translator"
    folder = project.state / "files" / "plugins" / "translator"
    assert (folder / "tools" / "translate.py").read_text() == "def translate(): ...\n"
    assert (folder / "manifest.yaml").is_file()
    assert list((project.state / "files" / "plugin-packages").iterdir()) == []  # the upload is gone

    # a multipart form works too, and a newer version replaces the folder's content
    boundary = "----dify-local-test"
    newer = package(("tools/v2.py", "x"), manifest=MANIFEST.replace("1.0.0", "1.1.0"))
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"package\"; filename=\"t.zip\"\r\n"
            "Content-Type: application/zip\r\n\r\n").encode() + newer + f"\r\n--{boundary}--\r\n".encode()
    sent = accepted(upload(project, form, f"multipart/form-data; boundary={boundary}"))
    task_result(project, sent["poll"])
    assert (folder / "tools" / "v2.py").exists() and not (folder / "tools" / "translate.py").exists()

    status, body = project.api.request("PUT", "/v1/plugin-index/translator", {"version": "1.2.0"})
    assert status == 200, body
    checked = task_result(project, accepted(project.api.post("/v1/plugins/check-upgrades"))["poll"])
    assert checked["upgradable"] == [{"name": "translator", "installed": "1.1.0", "latest": "1.2.0"}]
    [listed] = project.api.get("/v1/plugins")[1]["plugins"]
    assert listed["upgradable"] and listed["latest_version"] == "1.2.0" and listed["manifest"]["author"] == "langgenius"

    removed = task_result(project, accepted(project.api.request("DELETE", "/v1/plugins/translator"))["poll"])
    assert removed == {"name": "translator", "removed": True} and not folder.exists()
    assert project.api.get("/v1/plugins")[1] == {"plugins": []}
    assert project.api.request("DELETE", "/v1/plugins/translator")[0] == 404

    status, body = project.api.request("PUT", "/v1/plugin-index/translator", {"version": "latest"})
    assert status == 400 and body["field"] == "version"
    status, body = project.api.request("PUT", "/v1/plugin-index/Bad%20Name", {"version": "1.0"})
    assert status == 400 and body["field"] == "name"


BILLION_LAUGHS = "name: translator\nversion: 1.0.0\nauthor: me\n" + \
    "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + \
    "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9))


def patched(data: bytes, name: str, field: str, value: int) -> bytes:
    """The zip with one entry's general-purpose flags or compression method set to `value`, in its
    local header and its central directory record (zipfile will not write either as given)."""
    local, central = {"flags": (6, 8), "method": (8, 10)}[field]
    out = bytearray(data)
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
    out[info.header_offset + local:info.header_offset + local + 2] = value.to_bytes(2, "little")
    record = data.index(b"PK\x01\x02")
    while data[record + 46:record + 46 + len(name)] != name.encode():
        record = data.index(b"PK\x01\x02", record + 4)
    out[record + central:record + central + 2] = value.to_bytes(2, "little")
    return bytes(out)


@pytest.mark.parametrize("manifest, words", [
    (BILLION_LAUGHS, "aliases (*name) are not allowed"),
    ("name: x\nversion: 1.0.0\nauthor: me\nbase: &b {k: v}\nother:\n  <<: *b\n", "aliases (*name) are not allowed"),
    ("name: x\nversion: 1.0.0\nauthor: me\ndeep: " + "[" * 100 + "]" * 100 + "\n", "deeper than 64 levels"),
    ("name: x\nversion: 1.0.0\nauthor: me\ndeep: " + "{k: " * 100 + "v" + "}" * 100 + "\n", "deeper than 64 levels"),
], ids=["billion laughs", "merge key", "deep list", "deep mapping"])
def test_manifest_aliases_and_deep_nesting_are_refused(manifest, words):
    assert len(manifest.encode()) < 4096  # a few hundred bytes: the billion laughs is 470
    with pytest.raises(plugins.PluginPackageError, match=re.escape(words)) as refused:
        plugins.inspect_package(package(manifest=manifest), **LIMITS)
    assert refused.value.entry == "manifest.yaml"


def test_a_deep_json_manifest_is_refused():
    manifest = '{"name": "x", "version": "1.0.0", "author": "me", "deep": ' + "[" * 3000 + "]" * 3000 + "}"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", manifest)
    with pytest.raises(plugins.PluginPackageError, match="deeper than 64 levels"):
        plugins.inspect_package(buffer.getvalue(), **LIMITS)


LAYOUTS = [
    ([("manifest.yaml/", b"")], None, "manifest.yaml/", "'manifest.yaml/' is a folder"),
    ([("manifest.yaml/x", b"")], None, None, "no manifest"),
    ([("a", b"1"), ("a/b", b"2")], MANIFEST, "a", "'a' is a file, but 'a/b' needs a folder"),
    ([("a/b/c", b"2"), ("a/b", b"1")], MANIFEST, "a/b", "'a/b' is a file, but 'a/b/c' needs a folder"),
    ([("Tools.py", b"1"), ("tools.py", b"2")], MANIFEST, "tools.py", "differ only in case"),
    ([("caf\u00e9.py", b"1"), ("cafe\u0301.py", b"2")], MANIFEST, "cafe\u0301.py", "Unicode normalisation"),
    ([("MANIFEST.yaml", b"x")], MANIFEST, "MANIFEST.yaml", "differ only in case"),
    ([("x" * 300 + ".py", b"1")], MANIFEST, "x" * 300 + ".py", "at most 255 bytes a part"),
    ([("./", b"")], MANIFEST, "./", "the plugin folder itself"),
]


@pytest.mark.parametrize("entries, manifest, entry, words", LAYOUTS, ids=[case[3][:32] for case in LAYOUTS])
def test_entries_that_would_fail_to_unpack_are_refused_now(entries, manifest, entry, words):
    with pytest.raises(plugins.PluginPackageError, match=re.escape(words)) as refused:
        plugins.inspect_package(package(*entries, manifest=manifest), **LIMITS)
    assert refused.value.entry == entry, refused.value


@pytest.mark.parametrize("field, value, words",
                         [("flags", 0x1, "is encrypted"), ("method", 99, "compression method 99")])
def test_encrypted_entries_and_unknown_methods_are_refused_now(field, value, words):
    data = patched(package(("tools/a.py", b"x")), "tools/a.py", field, value)
    with pytest.raises(plugins.PluginPackageError, match=words) as refused:
        plugins.inspect_package(data, **LIMITS)
    assert refused.value.entry == "tools/a.py"


def test_a_damaged_entry_is_refused_when_checked_not_when_installed():
    good = package(("tools/a.py", b"print('a')\n" * 100))
    at = good.index(b"tools/a.py") + len("tools/a.py")  # the local header's name, then the deflated data
    damaged = good[:at + 10] + bytes(b ^ 0xFF for b in good[at + 10:at + 20]) + good[at + 20:]
    with pytest.raises(plugins.PluginPackageError, match="entry 'tools/a.py' is damaged") as refused:
        plugins.inspect_package(damaged, **LIMITS)
    assert refused.value.entry == "tools/a.py"


def test_entry_counts_are_read_before_the_directory_is_parsed():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("manifest.yaml", MANIFEST)
        for number in range(plugins.MAX_ENTRIES + 5):
            archive.writestr(zipfile.ZipInfo(str(number)), b"")
    with pytest.raises(plugins.PluginPackageError, match=f"{plugins.MAX_ENTRIES + 6} entries") as refused:
        plugins.inspect_package(buffer.getvalue(), max_package=10**8, max_unpacked=10**8)
    assert refused.value.too_large
