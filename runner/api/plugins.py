"""Plugins: upload a package (checked here, installed on the plugin queue), list what is installed,
keep the local index of latest versions, and ask which plugins can be upgraded."""

from __future__ import annotations

import json
import uuid

from flask import Blueprint, jsonify, request
from packaging.version import InvalidVersion, Version

from runner import plugins, safe_files
from runner.api.errors import ApiError
from runner.api.openapi import errors, json_body, json_response
from runner.api.validation import celery, database, json_object, sent, settings

blueprint = Blueprint("plugins", __name__)

ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/octet-stream")


def _upload(limit: int) -> bytes:
    """The package: a multipart form's `package` file, or the raw body (Content-Type application/zip)."""
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise ApiError(413, f"the upload is {request.content_length} bytes; PLUGIN_MAX_PACKAGE_SIZE allows {limit}")
    request.max_content_length = limit + 64 * 1024  # the form's own overhead on top of the package
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("package")
        if upload is None:
            raise ApiError(400, "the form must carry the zip in a file field named 'package'", field="package")
        data = upload.stream.read(limit + 1)
    elif request.mimetype in ZIP_TYPES:
        data = request.stream.read(limit + 1)
    else:
        raise ApiError(415, f"send the package as Content-Type application/zip or as multipart/form-data "
                            f"(field 'package'), not {request.mimetype or 'no content type'!r}")
    if not data:
        raise ApiError(400, "the package is empty", field="package")
    return data


@blueprint.post("/v1/plugins")
def upload_plugin():
    config = settings()
    data = _upload(config.PLUGIN_MAX_PACKAGE_SIZE)
    try:
        package = plugins.inspect_package(data, config.PLUGIN_MAX_PACKAGE_SIZE,
                                          config.DIFY_LOCAL_PLUGIN_MAX_UNPACKED_SIZE)
    except plugins.PluginPackageError as error:
        raise ApiError(413 if error.too_large else 400, f"plugin package refused: {error}",
                       **error.details()) from None
    paths = celery().dify.paths
    name = f"{uuid.uuid4()}.zip"
    safe_files.write_atomic(paths.root, paths.plugin_packages / name, data)
    result = celery().send_task("install_plugin_task", args=[name])
    return jsonify(sent(result, "install_plugin_task", name=package.name, version=package.version)), 202


@blueprint.get("/v1/plugins")
def list_plugins():
    with database().connect() as db:
        rows = list(db.query("SELECT p.name, p.version, p.installed_at, p.path, p.package_size, p.manifest, "
                             "p.latest_version, p.checked_at, i.version AS index_version FROM plugins p "
                             "LEFT JOIN plugin_index i ON i.name = p.name ORDER BY p.name"))
    for row in rows:
        row["manifest"] = json.loads(row["manifest"]) if row["manifest"] else None
        row["upgradable"] = plugins.is_newer(row["latest_version"], row["version"])
    return jsonify({"plugins": rows})


@blueprint.post("/v1/plugins/check-upgrades")
def check_upgrades():
    json_object(())
    result = celery().send_task("check_upgradable_plugin_task")
    return jsonify(sent(result, "check_upgradable_plugin_task")), 202


@blueprint.get("/v1/plugin-index")
def get_index():
    with database().connect() as db:
        return jsonify({"plugins": list(db.query("SELECT name, version FROM plugin_index ORDER BY name"))})


@blueprint.put("/v1/plugin-index/<name>")
def put_index(name: str):
    if not plugins.NAME.match(name):
        raise ApiError(400, "a plugin name is 1-128 lowercase letters, digits, _ or -, starting with a letter or "
                            "digit", field="name")
    body = json_object(("version",), required=("version",))
    version = body["version"]
    try:
        if not isinstance(version, str):
            raise InvalidVersion(version)
        Version(version)
    except InvalidVersion:
        raise ApiError(400, "'version' must be a version string such as \"1.2.0\"", field="version") from None
    with database().transaction() as db:
        db.execute("INSERT INTO plugin_index (name, version) VALUES (?, ?) "
                   "ON CONFLICT (name) DO UPDATE SET version = excluded.version", [name, version])
    return jsonify({"name": name, "version": version})


@blueprint.delete("/v1/plugins/<name>")
def uninstall_plugin(name: str):
    if not plugins.NAME.match(name):
        raise ApiError(400, "a plugin name is 1-128 lowercase letters, digits, _ or -, starting with a letter or "
                            "digit", field="name")
    with database().connect() as db:
        if not db.execute("SELECT 1 FROM plugins WHERE name = ?", [name]).fetchone():
            raise ApiError(404, f"no installed plugin {name!r}")
    result = celery().send_task("uninstall_plugin_task", args=[name])
    return jsonify(sent(result, "uninstall_plugin_task", name=name)), 202


NAME_PARAMETER = {"name": "name", "in": "path", "required": True,
                  "schema": {"type": "string", "pattern": plugins.NAME.pattern}}
PATHS = {
    "/v1/plugins": {
        "get": {"summary": "Installed plugins, with whether the local index has a newer version",
                "operationId": "listPlugins", "responses": {"200": json_response("the plugins")}},
        "post": {"summary": "Upload a plugin package (zip with manifest.yaml): checked now, installed on the "
                            "plugin queue", "operationId": "uploadPlugin",
                 "requestBody": {"required": True, "content": {
                     "application/zip": {"schema": {"type": "string", "format": "binary"}},
                     "multipart/form-data": {"schema": {"type": "object", "required": ["package"], "properties": {
                         "package": {"type": "string", "format": "binary"}}}}}},
                 "responses": {"202": json_response("accepted: poll the install task"),
                               **errors(400, 413, 415)}}},
    "/v1/plugins/check-upgrades": {
        "post": {"summary": "Compare installed plugins with the local index now", "operationId": "checkUpgrades",
                 "responses": {"202": json_response("accepted: poll the task"), **errors(400, 413)}}},
    "/v1/plugins/{name}": {
        "parameters": [NAME_PARAMETER],
        "delete": {"summary": "Uninstall a plugin (plugin queue)", "operationId": "uninstallPlugin",
                   "responses": {"202": json_response("accepted: poll the task"), **errors(400, 404)}}},
    "/v1/plugin-index": {
        "get": {"summary": "The local index of latest plugin versions", "operationId": "getPluginIndex",
                "responses": {"200": json_response("the index")}}},
    "/v1/plugin-index/{name}": {
        "parameters": [NAME_PARAMETER],
        "put": {"summary": "Set a plugin's latest version in the local index", "operationId": "putPluginIndex",
                "requestBody": json_body({"type": "object", "required": ["version"], "additionalProperties": False,
                                          "properties": {"version": {"type": "string"}}}),
                "responses": {"200": json_response("stored"), **errors(400, 413)}}},
}
