// dify-local dashboard: reads the API's JSON endpoints every few seconds and redraws the cards whose
// content changed. Plain JavaScript, no build step, nothing from elsewhere.
//
// Every value from the API goes into the page through html`` below, which escapes it: task
// arguments, errors and mail subjects are user data. Only html`` results are inserted unescaped.
"use strict";

(function () {
  const REFRESH_MS = 3000;
  const HISTORY_MINUTES = 60;
  const FLASH_MS = 15000;
  const SOURCES = {
    health: "/health",
    processes: "/v1/processes",
    queues: `/v1/queues?history=${HISTORY_MINUTES}`,
    workers: "/v1/workers",
    beat: "/v1/beat",
    runs: "/v1/task-runs?limit=50",
    failed: "/v1/failed?limit=50",
    metrics: "/v1/metrics?hours=24",
    mail: "/v1/mail?limit=20",
  };
  // marks the refresh's requests, which the API then leaves out of its log
  const POLL = { cache: "no-store", headers: { Accept: "application/json", "X-Dashboard-Poll": "1" } };

  // -- escaping -----------------------------------------------------------------------------------

  class Safe {
    constructor(text) { this.text = text; }
  }
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escape = (value) => String(value).replace(/[&<>"']/g, (c) => ESCAPES[c]);

  function piece(value) {
    if (value instanceof Safe) return value.text;
    if (Array.isArray(value)) return value.map(piece).join("");
    if (value === null || value === undefined || value === false) return "";
    return escape(value);
  }

  function html(strings, ...values) {
    let out = strings[0];
    values.forEach((value, index) => { out += piece(value) + strings[index + 1]; });
    return new Safe(out);
  }

  // -- formatting ---------------------------------------------------------------------------------

  let clockOffset = 0; // seconds the API's clock is ahead of the browser's (another machine)
  const now = () => Date.now() / 1000 + clockOffset;
  const number = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));
  const pad = (n) => String(Math.floor(n)).padStart(2, "0");
  const plural = (n, one, many) => `${number(n)} ${n === 1 ? one : many || one + "s"}`;

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const s = Math.max(0, seconds);
    if (s < 60) return `${Math.floor(s)}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${pad((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function runtime(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 1) return `${Math.max(0, Math.round(seconds * 1000))} ms`;
    if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
    return duration(seconds);
  }

  const ago = (t) => (t ? (now() - t < 1.5 ? "just now" : `${duration(now() - t)} ago`) : "—");
  const until = (t) => (t ? (t - now() < 0.5 ? "due now" : `in ${duration(t - now())}`) : "—");
  const stamp = (t) => (t ? new Date(t * 1000).toLocaleString() : "");

  function clock(t) {
    if (!t) return "—";
    const date = new Date(t * 1000);
    const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
    return new Date().toDateString() === date.toDateString()
      ? time : `${date.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}`;
  }

  const mebibytes = (n) => (n === null || n === undefined ? "—" : `${Math.round(n / 1048576)} MiB`);
  const shortId = (id) => (id ? String(id).slice(0, 8) : "");

  const COLOURS = {
    ready: "green", SUCCESS: "green",
    starting: "blue", reloading: "blue", STARTED: "blue", RECEIVED: "blue",
    backoff: "amber", restarting: "amber", stopping: "amber", RETRY: "amber",
    failed: "red", FAILURE: "red", REJECTED: "red",
  };
  const pill = (state, label, title) =>
    html`<span class="pill ${COLOURS[state] || ""}" title="${title || ""}">${label || state}</span>`;

  const code = (text) => html`<code>${text}</code>`;
  // the API's messages quote commands in `backticks`: shown as code, the rest as text
  const prose = (text) => String(text).split("`").map((part, index) => (index % 2 ? code(part) : part));
  const empty = (...parts) => html`<p class="empty">${parts}</p>`;
  const failure = (error) => html`<p class="empty error-text">Could not read this: ${error.message || error}</p>`;

  // -- drawing cards without flicker ------------------------------------------------------------------

  const rendered = new Map();
  let pressedIn = null; // the card a pointer is pressed in: not redrawn under a click

  document.addEventListener("pointerdown", (event) => { pressedIn = event.target.closest(".card"); }, true);
  document.addEventListener("pointerup", () => { pressedIn = null; }, true);
  document.addEventListener("pointercancel", () => { pressedIn = null; }, true);

  function update(id, meta, body) {
    const card = document.getElementById(id);
    const text = { meta: piece(meta), body: piece(body) };
    const key = text.meta + "\u0000" + text.body;
    if (rendered.get(id) === key || pressedIn === card) return;
    const selection = window.getSelection();
    if (selection && !selection.isCollapsed && card.contains(selection.anchorNode)) return; // being copied from
    rendered.set(id, key);
    card.querySelector("[data-meta]").innerHTML = text.meta;
    const container = card.querySelector("[data-body]");
    const scrolled = container.scrollTop;
    const open = [...container.querySelectorAll("details[open]")].map((details) => details.dataset.key);
    container.innerHTML = text.body;
    for (const details of container.querySelectorAll("details")) {
      if (open.includes(details.dataset.key)) details.open = true;
    }
    container.scrollTop = scrolled;
  }

  // -- the cards ------------------------------------------------------------------------------------

  function renderHealth(health, error) {
    const target = document.getElementById("health");
    let content;
    if (error) {
      content = html`<span class="item"><span class="dot bad"></span>${error.message}</span>`;
    } else {
      const { broker, database, ...others } = health.checks;
      // processes (under up), or workers and beat (their heartbeats): what is down, named
      const rest = Object.entries(others).map(([name, check]) => {
        const down = [...(check.failed || []), ...(check.not_ready || [])];
        const state = check.ok ? "ok" : down.length ? `not ready: ${down.join(", ")}` : "not running";
        return html`<span class="item" title="${check.error || ""}"><span class="dot ${check.ok ? "ok" : "bad"}"></span>
          ${name} ${state}</span>`;
      });
      content = html`
        <span class="item" title="${broker.error || ""}"><span class="dot ${broker.ok ? "ok" : "bad"}"></span>
          broker ${broker.ok ? `${broker.latency_ms} ms` : "unreachable"}</span>
        <span class="item" title="${database.error || database.path || ""}">
          <span class="dot ${database.ok ? "ok" : "bad"}"></span>database ${database.ok ? "ok" : "unavailable"}</span>
        ${rest}
        <span class="item url">${broker.url}</span>`;
    }
    const text = piece(content);
    if (rendered.get("health") !== text) {
      rendered.set("health", text);
      target.innerHTML = text;
    }
  }

  function spark(points, axis, at, depth, spanText) {
    if (!axis) return "";
    if (!points || !points.length) return html`<span class="nodata">no samples yet</span>`;
    const W = 170, H = 26, TOP = 2, BASE = 24;
    const span = Math.max(1, at - axis.since);
    const peak = Math.max(...points.map((p) => p[1]));
    const scale = Math.max(1, peak);
    const x = (t) => Math.min(W, Math.max(0, ((t - axis.since) / span) * W)).toFixed(1);
    const y = (d) => (BASE - (d / scale) * (BASE - TOP)).toFixed(1);
    const segments = [];
    let segment = [];
    points.forEach((point, index) => {
      if (index && point[0] - points[index - 1][0] > axis.step * 2.5) { segments.push(segment); segment = []; }
      segment.push(point);
    });
    segments.push(segment);
    const shapes = segments.map((part) => {
      const line = part.map((p, i) => `${i ? "L" : "M"}${x(p[0])} ${y(p[1])}`).join(" ");
      const area = `${line} L${x(part[part.length - 1][0])} ${BASE} L${x(part[0][0])} ${BASE} Z`;
      return part.length > 1 ? html`<path class="area" d="${area}"/><path class="line" d="${line}"/>` : "";
    });
    const last = points[points.length - 1];
    const label = `last ${spanText}: at most ${peak} waiting; now ${depth}`;
    return html`<svg class="spark ${peak ? "" : "flat"}" viewBox="0 0 ${W} ${H}" role="img" aria-label="${label}">
      <title>${label}</title><line class="base" x1="0" y1="${BASE + 0.5}" x2="${W}" y2="${BASE + 0.5}"/>
      ${shapes}<circle class="now" cx="${x(last[0])}" cy="${y(last[1])}" r="2"/></svg>`;
  }

  function consumers(queue) {
    const names = queue.consumers;
    if (!names.length) {
      return queue.depth ? pill("failed", "none", "no worker that answered consumes this queue")
        : html`<span class="zero">none</span>`;
    }
    return html`<span title="${names.join("\n")}">${names.length === 1 ? names[0] : plural(names.length, "worker")}</span>`;
  }

  // The charts' time axis: the last HISTORY_MINUTES, or since the first sample when the stack is younger
  // (a fresh stack would otherwise draw a dot at the right end of an empty hour).
  function chartWindow(data) {
    if (!data.history) return null;
    const first = data.history.first_sample_at;
    return { ...data.history, since: first ? Math.max(data.history.since, first) : data.history.since };
  }

  function renderQueues(data, error) {
    if (error) return update("queues", "", failure(error));
    const total = data.queues.reduce((sum, queue) => sum + queue.depth, 0);
    const axis = chartWindow(data);
    const span = axis ? data.at - axis.since : HISTORY_MINUTES * 60;
    const spanText = span < 120 ? `${Math.max(1, Math.round(span))} s` : `${Math.round(span / 60)} min`;
    const sampling = data.sample_interval
      ? `sampled every ${data.sample_interval} s` : "sampling off (DIFY_LOCAL_QUEUE_SAMPLE_INTERVAL=0)";
    const rows = data.queues.map((queue) => html`
      <tr data-queue="${queue.name}" class="${queue.depth ? "" : "idle"}">
        <td class="name"><span class="prio ${queue.priority || ""}"
          title="${queue.priority ? `${queue.priority} priority` : "not one of the 16 queues"}"></span>${queue.name}</td>
        <td class="num depth ${queue.depth ? "strong" : "zero"}" data-depth="${queue.depth}">${number(queue.depth)}</td>
        <td class="chart">${spark(queue.history, axis, data.at, queue.depth, spanText)}</td>
        <td class="num">${queue.oldest_age === null ? html`<span class="zero">—</span>` : duration(queue.oldest_age)}</td>
        <td class="nowrap">${consumers(queue)}</td>
      </tr>`);
    const note = data.workers_answered ? ""
      : html`<p class="note">No worker answered within a second, so no queue shows a consumer.</p>`;
    update("queues", `${plural(total, "message")} waiting · ${sampling}`, html`
      <table>
        <thead><tr><th>Queue</th><th class="num">Waiting</th><th>Last ${spanText}</th>
          <th class="num">Oldest</th><th>Consumers</th></tr></thead>
        <tbody>${rows}</tbody>
      </table>${note}`);
  }

  function renderProcesses(data, error) {
    if (error) return update("processes", "", failure(error));
    if (!data.running) {
      return update("processes", "not supervised", html`<div class="callout">${prose(data.message)}</div>`);
    }
    const rows = data.processes.map((p) => html`
      <tr data-process="${p.name}">
        <td class="name">${p.name}${p.this ? html`<span class="tag" title="the process serving this page">this</span>` : ""}</td>
        <td>${pill(p.status, p.status, p.last_exit === null ? "" : `last exit: ${p.last_exit}`)}</td>
        <td class="num">${p.pid || "—"}</td>
        <td class="num">${duration(p.uptime)}</td>
        <td class="num ${p.restarts ? "" : "zero"}">${number(p.restarts)}</td>
        <td class="num">${mebibytes(p.memory)}</td>
      </tr>`);
    const supervisor = data.supervisor || {};
    update("processes", `dify-local up · pid ${supervisor.pid} · up ${duration(supervisor.uptime)}`, html`
      ${data.message ? html`<div class="callout">${prose(data.message)}</div>` : ""}
      <table>
        <thead><tr><th>Process</th><th>State</th><th class="num">PID</th><th class="num">Uptime</th>
          <th class="num">Restarts</th><th class="num">Memory</th></tr></thead>
        <tbody>${rows}</tbody>
      </table>`);
  }

  function taskLine(task, reserved) {
    return html`<li>
      <span class="task">${task.name}</span>
      <span class="args" title="${task.args} ${task.kwargs}">${task.args}${task.kwargs !== "{}" ? ` ${task.kwargs}` : ""}</span>
      <span class="num">${reserved ? "reserved" : task.running_for === null ? "running" : runtime(task.running_for)}</span>
    </li>`;
  }

  function renderWorkers(data, error) {
    if (error) return update("workers", "", failure(error));
    if (!data.workers.length) {
      return update("workers", "none answering", empty(
        html`<strong>No worker answered within ${data.timeout} s.</strong> Messages wait in their queues until one
        consumes them: ${code("dify-local up")} starts a worker, ${code("dify-local ps")} shows whether it runs.`));
    }
    const running = data.workers.reduce((sum, worker) => sum + worker.active.length, 0);
    const blocks = data.workers.map((worker) => html`
      <div class="worker" data-worker="${worker.name}">
        <div class="head">
          <span class="name">${worker.name}</span>
          <span class="facts">${worker.pool || "?"} × ${worker.concurrency || "?"} · pid ${worker.pid || "?"}
            · <span title="${worker.queues.join("\n")}">${plural(worker.queues.length, "queue")}</span>
            · ${number(worker.processed)} done</span>
        </div>
        ${worker.active.length || worker.reserved.length
          ? html`<ul>${worker.active.map((task) => taskLine(task, false))}${worker.reserved.map((task) => taskLine(task, true))}</ul>`
          : html`<div class="idle">idle</div>`}
      </div>`);
    update("workers", `${plural(data.workers.length, "worker")} · ${running} running`, blocks);
  }

  function renderBeat(data, error) {
    if (error) return update("beat", "", failure(error));
    const parts = [];
    if (!data.running) {
      parts.push(html`<div class="callout"><strong>Beat is not running:</strong> no heartbeat on the broker in the last
        minute, so no periodic task is sent. ${code("dify-local up")} starts it (or ${code("dify-local serve beat")}).</div>`);
    }
    if (data.entries.length) {
      const rows = data.entries.map((entry) => html`
        <tr data-entry="${entry.name}">
          <td class="clip"><div class="name clip-line" title="${entry.name}">${entry.task}</div>
            <div class="sub">on ${entry.queue || "its route"}</div></td>
          <td class="nowrap">${entry.schedule}</td>
          <td class="num" title="${stamp(entry.last_run_at)}">${entry.last_run_at ? ago(entry.last_run_at) : html`<span class="zero">not yet</span>`}</td>
          <td class="num next-run" title="${stamp(entry.next_run_at)}">${until(entry.next_run_at)}</td>
        </tr>`);
      parts.push(html`<table>
        <thead><tr><th>Periodic task</th><th>When</th><th class="num">Last run</th>
          <th class="num">Next run</th></tr></thead>
        <tbody>${rows}</tbody></table>`);
    } else if (data.running) {
      parts.push(empty("Beat runs no periodic task: every ENABLE_* flag is off."));
    }
    if (data.disabled.length) {
      parts.push(html`<details class="off" data-key="off">
        <summary>${plural(data.disabled.length, "periodic task")} off</summary>
        <ul>${data.disabled.map((entry) => html`<li>${entry.task} (${entry.schedule}): set ${code(`${entry.flag}=true`)}</li>`)}</ul>
      </details>`);
    }
    const beat = data.heartbeat;
    update("beat", beat ? `ticking · pid ${beat.pid}` : "not running", parts);
  }

  function renderRuns(data, error) {
    if (error) return update("runs", "", failure(error));
    if (!data.runs.length) {
      return update("runs", "", empty("No task has been sent yet. Each one sent, started and finished is recorded here."));
    }
    const counts = {};
    data.runs.forEach((run) => { counts[run.state] = (counts[run.state] || 0) + 1; });
    const rows = data.runs.map((run) => {
      const failed = run.state === "FAILURE" && run.error;
      const detail = failed ? run.error : `${run.args}${run.kwargs !== "{}" ? ` ${run.kwargs}` : ""}`;
      const when = run.started_at || run.queued_at;
      const took = run.runtime !== null ? runtime(run.runtime)
        : run.state === "STARTED" && run.started_at
          ? html`<span class="muted" title="still running">${runtime(now() - run.started_at)}</span>` : "—";
      return html`<tr data-run="${run.id}" title="${run.id}${run.worker ? ` on ${run.worker}` : ""}">
        <td>${pill(run.state)}</td>
        <td class="name">${run.name}${run.attempts > 1 ? html`<span class="tag" title="attempts">×${run.attempts}</span>` : ""}</td>
        <td class="muted narrow" title="${run.queue || ""}">${run.queue || "—"}</td>
        <td class="clip mono ${failed ? "error-text" : ""}" title="${detail}">${detail}</td>
        <td class="num ${run.started_at ? "" : "muted"}"
          title="${run.started_at ? `started ${stamp(when)}` : `sent ${stamp(when)}, not started yet`}">${clock(when)}</td>
        <td class="num">${took}</td>
      </tr>`;
    });
    const summary = Object.keys(counts).sort().map((state) => `${counts[state]} ${state.toLowerCase()}`).join(" · ");
    update("runs", `latest ${data.runs.length}: ${summary}`, html`<table class="fixed">
      <colgroup><col class="w-state"><col class="w-task"><col class="w-queue"><col><col class="w-time"><col class="w-time">
      </colgroup>
      <thead><tr><th>State</th><th>Task</th><th>Queue</th><th>Arguments / error</th><th class="num">Started</th>
        <th class="num">Runtime</th></tr></thead>
      <tbody>${rows}</tbody></table>`);
  }

  let flash = null; // the outcome of the last Retry, shown for a while

  function renderFailed(data, error) {
    if (error) return update("failed", "", failure(error));
    const message = flash && Date.now() < flash.until
      ? html`<div class="flash ${flash.ok ? "ok" : "bad"}" role="status">${flash.text}</div>` : "";
    if (!data.failed.length) {
      return update("failed", "none", [message, empty(
        "No failed tasks. A task lands here when its retries are spent or its input is wrong (a ValueError, ",
        "LookupError or TypeError); Retry sends it again, same arguments, same queue.")]);
    }
    const pending = data.failed.filter((row) => !row.retried_at).length;
    const rows = data.failed.map((row) => html`
      <tr data-failed="${row.id}">
        <td class="num muted">${row.id}</td>
        <td class="name" title="task ${row.task_id}">${row.name}</td>
        <td class="muted narrow" title="${row.queue || ""}">${row.queue || "—"}</td>
        <td class="clip error-text" title="${row.error}">${row.error}</td>
        <td class="num" title="${stamp(row.failed_at)}">${clock(row.failed_at)}</td>
        <td class="nowrap">${row.retried_at
          ? pill("retried", `retried → ${shortId(row.retry_task_id)}`, `sent again as ${row.retry_task_id} at ${stamp(row.retried_at)}`)
          : pill("FAILURE", "failed")}</td>
        <td class="num"><button type="button" class="retry ${row.retried_at ? "again" : ""}" data-id="${row.id}"
          title="send ${row.name} again to ${row.queue || "its queue"} with the same arguments">${row.retried_at ? "Retry again" : "Retry"}</button></td>
      </tr>`);
    update("failed", `${pending} not retried · ${data.failed.length} listed`, html`${message}<table>
      <thead><tr><th class="num">#</th><th>Task</th><th>Queue</th><th>Error</th><th class="num">Failed</th><th>State</th>
        <th></th></tr></thead>
      <tbody>${rows}</tbody></table>`);
  }

  function renderMetrics(data, error) {
    if (error) return update("metrics", "", failure(error));
    if (!data.tasks.length) return update("metrics", "", empty("No task finished in the last 24 hours."));
    const rows = data.tasks.map((task) => html`
      <tr data-metric="${task.task}">
        <td class="name clip" title="${task.task}">${task.task}</td>
        <td class="num">${number(task.finished)}</td>
        <td class="num ${task.succeeded ? "" : "zero"}">${number(task.succeeded)}</td>
        <td class="num ${task.failed ? "error-text" : "zero"}">${number(task.failed)}</td>
        <td class="num ${task.retried ? "" : "zero"}">${number(task.retried)}</td>
        <td class="num">${runtime(task.runtime_mean)}</td>
        <td class="num">${runtime(task.runtime_max)}</td>
      </tr>`);
    update("metrics", "attempts finished, by task", html`<table>
      <thead><tr><th>Task</th><th class="num">Done</th><th class="num">OK</th><th class="num">Failed</th>
        <th class="num">Retried</th><th class="num">Mean</th><th class="num">Max</th></tr></thead>
      <tbody>${rows}</tbody></table>`);
  }

  function renderMail(data, error) {
    if (error) return update("mail", "", failure(error));
    if (!data.mail.length) {
      return update("mail", "empty", empty("The outbox is empty. With MAIL_TYPE=outbox, each mail the mail tasks ",
        "send lands here (and in .dify-local/files/outbox/ as an .eml file)."));
    }
    const rows = data.mail.map((mail) => {
      const date = Date.parse(mail.date);
      return html`<tr data-mail="${mail.name}">
        <td class="num" title="${mail.date}">${Number.isNaN(date) ? "—" : clock(date / 1000)}</td>
        <td class="nowrap clip-to" title="${mail.to}">${mail.to}</td>
        <td class="clip"><a href="/v1/mail/${encodeURIComponent(mail.name)}" target="_blank" rel="noopener"
          title="${mail.subject}">${mail.subject || "(no subject)"}</a></td>
      </tr>`;
    });
    update("mail", `${number(data.total)} in the outbox${data.total > data.mail.length ? `, latest ${data.mail.length}` : ""}`,
      html`<table><thead><tr><th class="num">Sent</th><th>To</th><th>Subject</th></tr></thead>
        <tbody>${rows}</tbody></table>`);
  }

  function tile(label, value, note, tone, small) {
    return html`<div class="tile ${tone || ""}"><div class="label">${label}</div>
      <div class="value">${value}${small ? html`<small>${small}</small>` : ""}</div><div class="hint">${note}</div></div>`;
  }

  function renderTiles(data) {
    const tiles = [];
    const p = data.processes;
    if (p && p.running) {
      const ready = p.processes.filter((row) => row.status === "ready").length;
      const trouble = p.processes.some((row) => ["failed", "backoff"].includes(row.status));
      tiles.push(tile("Processes", ready, trouble ? "one is failing: see Processes" : "under dify-local up",
        trouble ? "bad" : ready < p.processes.length ? "warn" : "", `/ ${p.processes.length} ready`));
    } else {
      tiles.push(tile("Processes", "—", p ? "not under dify-local up" : "unknown", "warn"));
    }
    const q = data.queues;
    if (q) {
      const total = q.queues.reduce((sum, queue) => sum + queue.depth, 0);
      const ages = q.queues.map((queue) => queue.oldest_age).filter((age) => age !== null);
      tiles.push(tile("Waiting", number(total), ages.length ? `oldest waiting ${duration(Math.max(...ages))}`
        : "every queue is empty", "", "messages"));
    } else {
      tiles.push(tile("Waiting", "—", "unknown"));
    }
    const w = data.workers;
    if (w) {
      const running = w.workers.reduce((sum, worker) => sum + worker.active.length, 0);
      const reserved = w.workers.reduce((sum, worker) => sum + worker.reserved.length, 0);
      tiles.push(tile("Running", number(running), `${plural(w.workers.length, "worker")} · ${reserved} reserved`,
        w.workers.length ? "" : "warn", "tasks"));
    } else {
      tiles.push(tile("Running", "—", "unknown"));
    }
    const f = data.failed;
    if (f) {
      const pending = f.failed.filter((row) => !row.retried_at).length;
      tiles.push(tile("Failed", number(pending), pending ? "not retried yet" : "nothing to retry", pending ? "bad" : "",
        "tasks"));
    } else {
      tiles.push(tile("Failed", "—", "unknown"));
    }
    const m = data.metrics;
    if (m) {
      const finished = m.tasks.reduce((sum, task) => sum + task.finished, 0);
      const failed = m.tasks.reduce((sum, task) => sum + task.failed, 0);
      tiles.push(tile("Last 24 h", number(finished), `${number(failed)} failed · ${plural(m.tasks.length, "task")}`,
        "", "attempts"));
    } else {
      tiles.push(tile("Last 24 h", "—", "unknown"));
    }
    const text = piece(tiles);
    if (rendered.get("tiles") !== text) {
      rendered.set("tiles", text);
      document.getElementById("tiles").innerHTML = text;
    }
  }

  // -- refreshing -----------------------------------------------------------------------------------

  async function getJSON(name) {
    const response = await fetch(SOURCES[name], POLL);
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      throw new Error(`${SOURCES[name]} answered ${response.status} without JSON`);
    }
    // /health says what failed in a 503's body: that is its answer, not an error
    if (!response.ok && !(name === "health" && body && body.checks)) {
      throw new Error(body && body.error ? body.error : `${SOURCES[name]} answered ${response.status}`);
    }
    return body;
  }

  let paused = false;
  let timer = null;
  let busy = false;
  let lastGood = null;

  async function refresh() {
    const names = Object.keys(SOURCES);
    const results = await Promise.allSettled(names.map(getJSON));
    const data = {};
    const errors = {};
    names.forEach((name, index) => {
      if (results[index].status === "fulfilled") data[name] = results[index].value;
      else errors[name] = results[index].reason;
    });
    const offline = document.getElementById("offline");
    if (!Object.keys(data).length) {
      offline.hidden = false;
      offline.textContent = `The API at ${location.origin} does not answer (${errors.health.message}). ` +
        `${lastGood ? `What you see is from ${lastGood.toLocaleTimeString()}. ` : ""}Trying again every ${REFRESH_MS / 1000} s.`;
      return;
    }
    offline.hidden = true;
    if (data.queues) {
      const offset = data.queues.at - Date.now() / 1000;
      clockOffset = Math.abs(offset) > 5 ? offset : 0; // another machine's clock; not a request's latency
    }
    renderHealth(data.health, errors.health);
    renderTiles(data);
    renderProcesses(data.processes, errors.processes);
    renderQueues(data.queues, errors.queues);
    renderWorkers(data.workers, errors.workers);
    renderBeat(data.beat, errors.beat);
    renderRuns(data.runs, errors.runs);
    renderFailed(data.failed, errors.failed);
    renderMetrics(data.metrics, errors.metrics);
    renderMail(data.mail, errors.mail);
    lastGood = new Date();
    document.getElementById("refreshed").textContent = `updated ${lastGood.toLocaleTimeString()}`;
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  }

  async function cycle() {
    clearTimeout(timer);
    if (!busy && !paused) {
      busy = true;
      try {
        await refresh();
      } catch (error) {
        console.error(error);
      } finally {
        busy = false;
      }
    }
    timer = setTimeout(cycle, REFRESH_MS);
  }

  document.getElementById("pause").addEventListener("click", (event) => {
    paused = !paused;
    event.currentTarget.setAttribute("aria-pressed", String(paused));
    event.currentTarget.textContent = paused ? "Paused" : "Pause";
    document.getElementById("refreshed").textContent = paused ? "not refreshing" : "resuming…";
    if (!paused) cycle();
  });

  document.getElementById("failed").addEventListener("click", async (event) => {
    const button = event.target.closest("button.retry");
    if (!button || button.disabled) return;
    const id = button.dataset.id;
    button.disabled = true;
    button.textContent = "Sending…";
    try {
      const response = await fetch(`/v1/failed/${encodeURIComponent(id)}/retry`,
        { method: "POST", headers: { Accept: "application/json" } });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(body.error || `the API answered ${response.status}`);
      flash = { ok: true, until: Date.now() + FLASH_MS,
        text: `Failed task ${body.id} (${body.task}) sent again to ${body.queue}: task ${body.retry_task_id}.` };
    } catch (error) {
      flash = { ok: false, until: Date.now() + FLASH_MS, text: `Could not retry failed task ${id}: ${error.message}` };
    }
    rendered.delete("failed");
    pressedIn = null;
    cycle();
  });

  cycle();
})();
