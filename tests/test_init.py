"""`dify-local init`: a new project's Procfile and local_config/, never overwriting the user's own."""

from __future__ import annotations

from runner.settings.reference import render_defaults_env
from runner.supervisor.procfile import DEFAULT_PROCFILE


def test_init_writes_a_project_that_runs(project):
    done = project.run("init")
    assert done.returncode == 0, done.stderr
    assert "wrote Procfile, local_config/defaults.env, local_config/local.env, .gitignore" in done.stdout
    assert (project.dir / "Procfile").read_text() == DEFAULT_PROCFILE
    assert (project.dir / "local_config" / "defaults.env").read_text() == render_defaults_env()
    assert ".dify-local/" in (project.dir / ".gitignore").read_text()
    topology = project.run("topology")  # the settings and Procfile it wrote are read without complaint
    assert topology.returncode == 0, topology.stderr
    assert "Procfile" in topology.stdout


def test_init_refuses_to_overwrite_and_force_keeps_the_users_files(project):
    (project.dir / "Procfile").write_text("web: python web.py\n")
    refused = project.run("init")
    assert refused.returncode == 1
    assert "has Procfile already; nothing was written" in refused.stderr
    assert (project.dir / "Procfile").read_text() == "web: python web.py\n"
    assert not (project.dir / "local_config").exists()

    (project.dir / "local_config").mkdir()
    (project.dir / "local_config" / "local.env").write_text("CELERY_WORKER_AMOUNT=3\n")
    forced = project.run("init", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "kept your local_config/local.env" in forced.stdout
    assert (project.dir / "Procfile").read_text() == DEFAULT_PROCFILE
    assert (project.dir / "local_config" / "local.env").read_text() == "CELERY_WORKER_AMOUNT=3\n"


def test_init_into_a_new_folder_and_bad_targets(project):
    done = project.run("init", "sub/stack")
    assert done.returncode == 0, done.stderr
    assert (project.dir / "sub" / "stack" / "Procfile").is_file()
    assert "cd " in done.stdout  # the next step names the folder
    (project.dir / "file").write_text("")
    bad = project.run("init", "file")
    assert bad.returncode == 2 and "is a file" in bad.stderr and "Traceback" not in bad.stderr
