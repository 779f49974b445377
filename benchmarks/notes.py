"""The prose of docs/benchmarks.md: how each figure is measured, why a figure misses its aim, and
what was fixed. Kept apart from the numbers so a rerun refreshes the tables and keeps the analysis.
Component costs quoted here were measured one at a time on the benchmark machine (2 vCPU AMD EPYC,
Python 3.11) while profiling; the tables are what the last run measured."""

AIMS = """\
Reading the verdicts: the aims are ratios to floors that do strictly less than the agent (the echo
server parses no JSON and runs no model; the deploy floor verifies no signature, selects nothing,
validates nothing). Where a figure misses, the analysis below says what is the agent's own cost
(cut where it could be, see "What was fixed") and what belongs to a design choice or a library.
Run-to-run spread on this shared 2-vCPU VM is large for sub-millisecond figures (the echo floor's
p50 moved between 55 and 176 µs across runs): compare the ratios of one run, not figures of two.

**Where the figures miss, and why**
- *Daemon with a model ≤ runtime-plus-model floor + 10 MB* (all rows miss): the margin is smaller
  than the MQTT client alone. Python + paho connected costs 10.4 MB over bare Python (paho imports
  `ssl`, `urllib.request`, `http.client`, `email` and more: the "Python + paho connected" floor
  minus "bare Python"), so no agent that keeps an MQTT session could pass it in one process. With
  `isolation = "none"` the gap is that 10.4 MB plus ≈ 6 MB of the agent's own (SQLite, the HTTP
  server, the deploy state machine, threads); numpy and the runtime are shared with the floor, and
  `cryptography` is no longer loaded at all. With process isolation (the default) the tree holds
  two processes by design: the worker, at the runtime-plus-model floor plus ≈ 5 MB (the HTTP handler
  it now runs itself), and the daemon at its idle size (≈ 29 MB: a second interpreter, paho and the
  agent). Since this round the daemon stays at that size with models served: after signed
  commands, validation, swaps and HTTP inference it maps neither numpy, `cryptography` nor a
  runtime (checked by a test). PSS, which splits the shared libraries between the two
  processes, is the fairer figure for the tree (see the footprint table). The Mender client (Go,
  31.5 MB idle) and the agent idle at about the same size; Greengrass asks for ≥ 96 MB.
- *Idle daemon ≤ 30 MB* (misses by ≈ 2.5 MB since the hardening round, 32.5 MB): the daemon now imports
  argparse, psutil and keeps the hardware-detection modules (libraries instead of hand-written
  replacements: +1.3 MB measured side by side), plus httptools, the admission and retention code.
  orjson and difflib now load at their first use (−0.15 MB of RSS; the server's metadata document
  is written by the standard library, so an idle daemon maps no orjson: measured after the
  table's run, PSS −2.0 MB and USS −1.5 MB, RSS −0.2 MB, orjson's pages being mostly shared with
  other processes). What the idle daemon holds over the
  "Python + paho" floor, by traced Python allocations: the agent's own modules ≈ 3.5 MB (the
  command intake with the deploy stack it imports ≈ 1 MB, hardware detection ≈ 0.4 MB, the worker
  wire records ≈ 0.2 MB), `dataclasses`/`inspect`/`ast` ≈ 1.1 MB, psutil ≈ 0.9 MB, argparse
  ≈ 0.3 MB, SQLite ≈ 0.3 MB plus its library; `malloc_trim` after start gives back ≈ 0.6 MB.
  Reaching 30 MB takes loading the deploy stack at the first command instead of at start — a
  change to the composition root, not to a module.
- *KServe v2 p50 ≤ 1.5× echo* (tiny model; two runs of the serving section on the final code:
  1.39–2.03× in the full run, 1.48–2.25× in a rerun minutes later; each run meets it in some
  rows and misses in others): this VM cannot judge a 1.5× ratio at this scale. The echo floor's
  own p50 for two near-identical request bodies differed 2× within one run (0.055 ms for JSON
  against 0.107 ms for binary in the rerun), and between runs it moved from 0.055 to 0.176 ms,
  while the agent's p50 stayed within 0.114–0.261 ms. What the agent adds is measured side by
  side instead: HTTP is parsed by llhttp through httptools (its per-header callbacks cost
  ≈ 5–7 µs per request over the former hand-written parser), and requests pass the
  Host/Origin/content-type checks, the per-process body budget and the per-model admission. A
  figure never justifies replacing a maintained HTTP parser: that part is the price of those
  bounds, reported. The request's own Python around the parser (checks, routing, admission,
  codecs, registry) was cut from 21–23 to 14–16 µs per request (CPU time, side by side in one
  process); with both daemons and the echo floor alternating in one run, 1.41–1.83× → 1.27–1.70×,
  lower in 15 of 16 pairs. With process isolation the request is answered inside the worker, on
  its bounded threads (section 12); one client is answered by the thread that read it, with no
  hand-over, and side by side with the former thread per connection its p50 was equal within
  the noise (new/old 0.99–1.14 over three runs of 10–12 pairs). On the CNN the ratio to an echo
  means little: with binary tensors the model's own 1 ms and the request's 600 KB dominate; JSON
  tensors are decoded by orjson where installed (section 10).
- *Per-call overhead ≤ 2 µs* (met: 1.83 µs in the table; 2.13 µs in the full run an hour
  earlier; it had grown to 3.8–4.3 µs after the hardening round, was 1.4 µs before it): the call
  passes per-model admission (a size bound from the model's inputs, the in-flight/queue gate,
  the shape book that tells a caller's uncomputable shape from a model fault) and an in-flight
  gate with a lock in place of one relying on list atomicity. All of them stay; the call now
  does its bookkeeping in two critical sections of the registry's one lock (see "What was
  fixed"): 4.0 → 1.85 µs of CPU time per call with the observer, side by side in one process.
  The margin is small: a loaded run can land just over the line, as the full run did.
- *Swap p99 ≤ 2× steady* (met in both modes, zero errors; a quick run before the worker's
  bounded threads missed it, its steady p99 of a few hundred requests being within the
  scheduling noise of starting a new worker on 2 cores).
- *At 8 clients, requests/s within ±10 % across the repeats* (section 12, judged per model and
  encoding, the final code): met on the small model as JSON (±7.5 %), missed as binary (±11.0 %)
  and on the CNN (JSON ±14.5 %, binary ±15.7 %). The peers in the same run spread about as much
  (KServe ±3.7–17 %, the FastAPI app ±4.6–11.7 %, MLServer ±6.8 %), at load averages 1.7–2.8
  from the servers and clients themselves. The server-CPU-per-request figure tells a busier
  machine from a costlier request: in the repeats that ran slower the agent's CPU per request
  rose with them (small model binary 159 → 182 µs, CNN JSON 2,165 → 2,562 µs), and the same
  rise showed with the former thread per connection and once on an otherwise idle machine, so
  part of it is this VM's own (its CPU time per unit of work varies between minutes), not
  contention between the worker's threads. Before the worker's bounded threads the small model
  spread ±29 % to ±54 % (JSON and binary) in two runs at load averages 2.9–6.7; side by side in
  one run the thread-per-connection worker spread −1.8 %/+41 % where the bounded threads spread
  −0.9 %/+4.5 %, and over longer runs both swung between about 4k and 9.7k requests/s. The aim
  is met on the figure the issue measured (small model, JSON) and missed by 1–6 points elsewhere.
- *Small model at 8 clients ≥ 1.5× the best peer* (section 12): met, 3.48× the FastAPI app (the
  best peer at 8 clients), and in the agent's slowest repeat too.
- *Dynamic batching ≥ 1.3× unbatched* (missed over HTTP and in process): on 2 CPU cores one
  request already keeps both cores busy and a batched call is no cheaper per image; section 11
  gives the three steps, each with the figure measured in the run that checks it.
- *Deploy at the defaults (autotune)*: the first deploy of a model layout loads and times the top
  candidates (here onnxruntime and OpenVINO, in parallel workers started during the download):
  at 200 MB that first deploy is the slowest repeat (the p99 column), just over the limit; later
  versions of the same layout reuse the verdict (`"basis": "layout"`), are validated as usual, and
  are well within it. Pinned deploys meet the aim at every size in both modes.
"""

FOOTPRINT = """\
Memory is read from /proc for the daemon **and all its descendants** (its model workers): RSS
summed over the processes (a shared library mapped by two
processes counts twice), PSS (shared pages split between the processes that map them: the fairest
single number for a tree), USS (pages only this tree holds). Floors run in fresh processes in the
same run: bare Python; Python with paho-mqtt connected to the same broker; Python with the runtime
imported, the same small model loaded and run once (the tiny MLP of the bundle, in each runtime's
own format). "Daemon + model" deploys that bundle with the backend pinned, sends 20 requests, and
reads the tree. Idle is read once the one-off backend probe of a first boot (a child process, a
few seconds after start) is over. Start-up is from `exec` to the retained `online: true` status
arriving at a subscriber on the broker."""

SERVING = """\
The tiny model is a 16→32→4 MLP; the realistic one a 224×224×3 CNN (six strided 3×3 convolutions,
16→256 channels, global pooling, 1000-way softmax). Requests are KServe v2 `infer` with the input
as a JSON list or as a binary tensor (the output too, `binary_data_output`), sent by a lean HTTP/1.1
keep-alive client (prepared request bytes, one `sendall`, Content-Length framing) from the
benchmark process; the echo floor gets the very same request bodies from the same client and sends
them back. p50/p99 are over single-client sequential requests, the agent's and the echo floor's in
alternating batches (so load from elsewhere on the machine hits both alike); requests/s run 1, 4 and 16
concurrent keep-alive clients (threads) for a fixed time. Clients and server share the 2 cores.

The per-call table measures, in one process with the runtime in it, `sess.run` called directly,
`check_inputs` alone, the backend's `infer`, `Registry.infer` (what the HTTP handler and agentctl
call), and the same with the daemon's telemetry observer wired in as the daemon wires it (the
latency windows, which also feed `/metrics`); "overhead" is the median over interleaved rounds of
`Registry.infer` minus the direct call. The worker process row calls the same model through
`IsolatedModel`'s pipe: the path of `agentctl infer` and of requests the daemon relays; HTTP
infer requests are answered inside the worker (the connection is handed over) and pay no pipe."""

DEPLOY = """\
Each row deploys new bytes (a linear model whose weights make the bundle 1, 50 or 200 MB, a new
seed per repeat, so nothing is reused from the content-addressed store) as the next version of the
model, with `deploy.probation_s = 0` so SUCCEEDED is not held back by design. Time runs from the
signed command's publish to the SUCCEEDED job update, both seen by the fleet-side client. The floor
(`benchmarks/floors.py deploy`) downloads the same files from the same server with requests in
1 MiB chunks, hashes while streaming, fsyncs, then creates the onnxruntime session: with its
imports done before the clock starts, as in a running daemon."""

SEALED = """\
Deploy time of an age-encrypted bundle (`fleetctl bundle build --encrypt-to`, docs/security.md)
beside the same-sized plain bundle, to one daemon (`backends.isolation = "process"`, pinned to
onnxruntime, `deploy.probation_s = 0`), plain and encrypted deploys alternating, new bytes each
time. The encrypted floor (`benchmarks/floors.py sealed-deploy`) downloads the ciphertext with
requests in 1 MiB chunks, hashes while streaming, fsyncs, decrypts it with pyrage into memory,
hashes the plaintext, then creates the onnxruntime session from the bytes: everything a device
must do, alone in one warm process. The agent additionally starts the worker, checks the device
is a recipient, and validates on the golden samples."""

JSONCODEC = """\
The KServe v2 codec alone, in one process, without HTTP: `decode_request` turns the JSON body of
the PP-OCR classifier's request (a [1,3,48,192] float32 tensor written as JSON numbers) into the
numpy feed; `encode_response` writes the [1,2] reply. The standard library's `json` spends most of
the decode building one Python float per number; orjson (a core dependency; wheels for x86_64,
aarch64 and armv7) parses the same text in a fraction of that, and numpy's conversion to a float32
array then dominates. Both paths give identical tensors and errors (tests/unit/test_json_tensors.py):
what orjson refuses (NaN, Infinity, lone surrogates, bad text) is decided by the standard library,
and a refused request is read again by it, so the error is the same; the one difference is an
integer beyond 64 bits, which orjson reads as a float. The body here is 570 KB (the issue's figure
of 574 KB came from another random tensor: the same shape, digits differ)."""

BATCHING = """\
A CNN shaped like the PP-OCR text classifier (input [N,3,48,192], four 3×3 convolutions 32→256
channels, ≈ 130 M multiply-adds per image, a 2-way softmax) with a dynamic first dimension. The
aim is judged over HTTP through the real daemon: one daemon per setting (`serving.max_batch` = 1
or 8 with `serving.max_queue_delay_us` = 500; `backends.threads` = 0, onnxruntime's default, or
1), the model deployed by a signed command and pinned to onnxruntime, 8 keep-alive clients
sending binary tensors (JSON would add the same decoding to both settings, section 10), the
daemons taking turns with the order reversed every other repeat, admission at its defaults
(`backends.max_inflight` = 4, so a batch holds at most 4 requests). The in-process rows run the
same load through `Registry.infer` without HTTP.

Why the aim of 1.3× is missed on this 2-vCPU machine, step by step, each with the figure that
checks it:
- *One request already uses both cores.* onnxruntime's default intra-op pool (one thread per
  core) runs one image in about half the time one thread takes (the per-image line, batch 1,
  default threads against one: 0.69 against 1.18 ms in the table's run; 0.70 against 1.23 and 1.18 against 2.53 ms in earlier runs). With batching off the 4
  calls admission lets in at once keep both cores busy, so one thread per call serves about as
  many requests/s at 8 clients as the default (the two "off" rows).
- *A batched call is no cheaper per image here.* The convolutions are compute-bound: 4 images in
  one call cost about what 4 single calls cost (the per-image line, batch 4 against batch 1:
  0.62 against 0.69 ms with the default threads and 1.19 against 1.18 ms with one in the table's run, within ≈ 15 % either way in earlier runs). Batching trades on a fixed cost per call to share,
  and on a CPU running this model there is almost none.
- *What batching costs then shows.* With 4 requests admitted all 4 join one batch, so one
  runtime call runs where four overlapped, and the next requests' decoding waits behind it (the
  HTTP layer holds a request's admission slot from decoding to encoding); add the wait for the
  batch to fill (≤ 500 µs), the concatenation and the split. With one intra-op thread that single
  call uses one core of two: the on/threads=1 row is the slowest.

In the table's run batching on gave 0.67× the unbatched throughput over HTTP (0.51× with one
intra-op thread) and 0.90× in process; across earlier runs at load averages of 1 to 7 (other
work shares the machine) 0.77× to 1.17× over HTTP and 0.66× to 1.11× in process. With the
default threads its p99 at 8 clients was at most 3 % worse than unbatched and down to half of it
(fewer calls competing for the cores). The gain the aim expects comes where a call has a large fixed cost next to its
arithmetic: an accelerator (GPU, NPU) or a model of small per-row work; `serving.max_batch`
stays off by default and is set per model from the manifest where it helps."""

SWAP = """\
Four keep-alive clients send tiny-model JSON requests back to back. The steady window has nothing
else running; the swap window runs that many signed deploys of new versions one after the other
(each downloads, loads in a new worker or session, validates on golden samples, activates, and
retires the old version: a request in flight finishes on it, and with process isolation each
client connection moves to the new worker at its next request boundary). Errors count every non-200 answer and every
broken connection. The figure is the latency the clients see while the device also does the
deploy work on the same two cores."""

TELEMETRY = """\
Sizes are what the broker routed, counted as MQTT 5 QoS 1 PUBLISH packets (fixed header, topic,
packet id, properties length, payload) plus the PUBACK; per day at the defaults is one heartbeat
and (while a model serves) one latency window per 60 s, plus keep-alive pings every 60 s. TCP/IP
headers (≈ 52 bytes per segment) are not counted. The default `telemetry.daily_budget_mb = 1`
thins telemetry before 1 MB/day is passed, so the measured rate is what a device sends with room
to spare; each further model adds its own entry to the window. Drain: the broker is stopped while
heartbeats are queued every 50 ms, then restarted; the rate is over the messages stamped during the
outage, at the default pacing (`telemetry.drain_rate_per_s = 50`, after a burst) and at the
maximum setting (what the outbox and the connection can do)."""

FLEET = """\
`fleetctl sim` (tools/fleetctl/sim.py) runs the devices: one real MQTT 5 client each (persistent
session, retained status, Last Will), multiplexed on one epoll event loop per process (two processes
here); each device verifies the signed group command with the agent's own `CommandVerifier`,
fetches and verifies the signed manifest (once per process), then reports QUEUED, every deploy step
and SUCCEEDED (20 ms a step). Heartbeats and telemetry every 60 s, as the agent's defaults. CPU is
user + system time of the simulator processes over the window divided by the devices (and the
broker's apart). Messages/s counts every device message the broker delivered to the fleet-side
subscriber during the wave."""

COLLECT = """\
`fleetctl sim` devices (two processes, one MQTT 5 client each, one model) publish heartbeats and
latency windows (64 calls each, with the agent's own `Window` and `log2/8` histogram) at the
agent's default 60 s periods divided by the compression factor, through one Mosquitto into two
`fleetctl collect` processes sharing `$share/bench/…` (telemetry, events and jobs split between
them; status and heartbeats reach both). Messages/s is what the collectors together took from the
broker during the window (from their own `edge_fleet_messages_received_total`). The simulators
may not keep up with the asked periods on a busy machine: the table gives the periods they
achieved (from the telemetry rate), and CPU — the collectors' user + system time over the window,
both together — is scaled back to the real 60 s periods per 1,000 devices by that achieved rate. RSS
is each collector's growth over its idle size, per 1,000 devices (each holds every device's
state). Lost: the collectors' own count (gaps in heartbeat `seq`, exact since both take every
heartbeat) and a reference subscriber's count of every device's highest telemetry `seq` against
the telemetry the two collectors hold together. The machine is shared with other work while this
runs, so CPU figures are noisy (an upper bound)."""

SOURCES = """\
The figure users compare: what one prediction costs when a model trained with XGBoost is served by
the agent instead of being called in the training framework. The model is built with `fleetctl
bundle build model.json` (converted by onnxmltools, certified against XGBoost's own predictions:
docs/model-sources.md) and deployed with a signed command; the agent serves it with onnxruntime
(selection names the ONNX-ML operators OpenVINO cannot run). The agent rows include the HTTP request,
JSON or binary tensors and the hand-off to the model's worker process; the in-process rows include
none of that."""

FIXES = """\
## What was fixed for these figures

Third round (after the hardening round; every bound kept, each change measured side by side with
the code before it in one run, CPU time, the tiny model):
- **One lock for a call's bookkeeping** (`agent/serving/registry.py`): the version lookup, its
  in-flight count and the model's admission slot are taken in one critical section of the
  registry's lock and given back in one (the in-flight gate and the admission share that lock;
  a call that must queue waits on a condition over it). Five lock round trips and their method
  calls per call became two. With the size check made once per version and giving the shape key
  in the same pass, `check_inputs` handing back the caller's dict when everything fits, and the
  HTTP slot a plain context manager: per-call overhead 4.0 → 1.85 µs; the request path's own
  Python 21–23 → 14–16 µs (a request's body bound made at activation and read once, shapes
  read in one pass, numpy dtypes looked up once, a small float reply checked for NaN without
  numpy). Differential tests hold each fast path to the full checks on random shapes, dtypes and
  values.
- **Idle daemon**: orjson and difflib imported at first use (−0.15 MB).

Second round (the changes behind the figures above):
- **HTTP infer answered inside the worker** (`agent/serving/adopted.py`, `agent/backends/isolated.py`,
  `agent/serving/kserve.py`): with process isolation the daemon relayed every request through the
  worker's pipe (≈ 0.2 ms: two cross-process wake-ups and pickling, 3× the echo floor). It now
  reads the request head and hands the connection itself to the model's worker (SCM_RIGHTS with
  the bytes already read), which answers it and the following requests with the same handler
  code; other requests, swaps and worker deaths give the connection back at a request boundary.
  Tiny-model p50 in process mode 3.0× → ≈ 1.4–1.5× the echo floor, the same as in-process.
- **No `multiprocessing`** for workers: plain child processes on socket pairs with length-prefixed
  pickles, so the resource tracker process (≈ 15 MB RSS) no longer rides along with the first
  worker, and neither the daemon nor a worker imports `multiprocessing` (≈ 1.7 MB each).
- **No `cryptography` in the daemon** (`agent/bundles/ed25519.py`): Ed25519 checks go through
  `EVP_DigestVerify` of the OpenSSL libcrypto the interpreter has already mapped for `hashlib`
  (self-tested against RFC 8032 at first use, `cryptography` as the fallback): ≈ 9 MB less in
  the daemon after its first command.
- **Golden samples checked where the model runs** (`agent/backends/golden.py`): validation and
  autotune run the golden check and the timed runs inside the worker, so numpy (≈ 14 MB) never
  enters a process-isolated daemon and 6.5 MB of golden inputs no longer cross the pipe per run.
- **Deploy**: sha256 while streaming (no read-back), validation timing bounded when no SLO needs
  20 runs, autotune's check of the winner stands in for the validating step, autotune verdicts
  reused for a retrained model of the same layout, candidates loaded two at a time in workers,
  no OpenVINO compile cache on CPU (+0.5 s and a second copy of the weights per version), and the
  workers for the first candidates started (interpreter, runtime import) while the bundle
  downloads.
- **Telemetry observer** (`agent/telemetry/windows.py`, `metrics.py`): one observer (a lock, a
  lookup, an append; batches folded every 256 calls into identical histograms), Prometheus text
  rendered at scrape time without prometheus-client: 2.7 → ≈ 0.5 µs per call. The in-flight gate
  went from 5.8 to ≈ 1.4 µs per call as the daemon runs it; it now counts under one plain lock
  again (enter + leave 0.11 → 0.42 µs in a `timeit` loop: readable beats a CPython list-atomicity
  argument for 0.3 µs).
- **Worker path**: one write per slot state change, one poll object per connection; handed-over
  connections read through a C buffered reader; UTF-8 request bodies decoded without json's
  encoding sniffing.
- **Idle daemon** 36 → ≈ 29 MB: no prometheus-client, the HTTP server without `http.server`
  (html entities, mimetypes), autotune, the archive reader, ftplib, `importlib.metadata` and
  `ctypes.util` imported only when used, SQLite page caches capped, `malloc_trim` after start.
  Replacements that saved less than 1 MB were later dropped for the library again (idle RSS of a
  fresh daemon, median of 3–5, measured with psutil on the same machine, 30.8 MB before): psutil
  for the heartbeat figures +0.8 MB, argparse for the command line +0.5 MB, keeping the hardware
  detection modules after the start-up report (no `sys.modules` pruning) +0.2 MB; 30.8 → 32.1 MB
  with all three (+1.3 MB; the footprint aim of ≤ 30 MB idle, 28.9 MB at the last full run, is
  the figure to recheck). `importlib.metadata` stays out (+1.2 MB measured), behind
  `probed.dist_versions`, which a differential test checks against it.

First round:

- **No runtime in the idle daemon** (`agent/backends/probed.py`, `agent/daemon/`): listing the
  backends' targets imported onnxruntime, OpenVINO and LiteRT (and numpy) into the daemon for its
  whole life: 114 MB idle RSS. Targets now come from a short-lived child process, cached in memory
  and in `state_dir/cache/backend-targets.json` under a key of the runtime versions, device nodes
  and environment (a plugged-in accelerator changes it); the probe starts in the background at
  start-up so the first deploy does not wait for it (the probe had cost 0.6 s of every first deploy).
- **`cryptography` at the first signature, not at start** (`agent/bundles/trust.py`,
  `agent/bundles/dsse.py`): trusted keys in the standard PEM form are read as raw 32-byte keys and
  their key objects made when a signature names them; anything else still goes through
  `cryptography`. ≈ 7 MB of idle RSS. Idle daemon: 114 → ≈ 36 MB RSS in all.
- **Workers import only their runtime**: the "spawn" start method re-ran the daemon's main module
  in every worker (`agent/backends/isolated.py` now spawns with a bare `__main__`); the worker
  looked its backend up through `agent.deploy.runner`, which imports the daemon's stack
  (`find_backend` moved to `agent/backends/__init__.py`, re-exported by the runner);
  `agent/bundles/manifest.py` imported `cryptography` for a dataclass the worker needs (the DSSE
  import is now local to the two functions that sign or verify); and `agent/hardware/__init__.py`
  loaded all hardware detection for the telemetry opt-outs the backends need (its names now load
  on first use, PEP 562). Worker with onnxruntime: 74 → ≈ 57 MB RSS, under the runtime-plus-model
  floor; worker start ≈ 45 ms faster.
- **`check_inputs`** (`agent/backends/base.py`), on every call: a per-signature plan (numpy dtype,
  rank, fixed dimensions) checked without `str(dtype)` or generator expressions; the original
  checks still word every refusal. 4.8 → 0.45 µs. The plans were first kept in a dict keyed by
  `id(specs)`; they are now a `functools.lru_cache` keyed by the specs themselves (hashing them
  costs ≈ 0.1–0.4 µs per call on the shared bench machine, one input: 0.32 → 0.43 µs best of
  interleaved runs).
- **In-flight gate and registry** (`agent/backends/base.py`, `agent/serving/registry.py`): a plain
  lock and a notify only when someone waits to retire a version (enter + leave 1.2 → 0.4 µs), and
  the registry's acquire inlined into `infer`. `Registry.infer` + `check_inputs`: 10.4 → ≈ 1.5 µs.
- **Worker round trip** (`agent/backends/isolated.py`): `Connection.poll()` builds a selector on
  every call; one `select.poll` object per channel, made once, saves ≈ 60 µs per call on this VM.
"""

AUTOTUNE = """\
The CNN of section 11 (shaped like the PP-OCR text classifier, input [N,3,48,192]) as a plain
ONNX bundle, deployed at the defaults (autotune on, nothing pinned) to two fresh daemons that differ only in `backends.autotune_objective`
(`"latency"`, `"throughput"`; `backends.autotune_concurrency = 8`, the load measured after).
Autotune loads the runtimes that read the bundle (here onnxruntime and OpenVINO, both on the
CPU) in the model's worker, checks each on the golden samples, and measures both figures for
every candidate: the median of single calls and the calls per second of 8 callers at once. The
objective only decides which figure picks the winner; the table is the deploy's verdict as
`agentctl explain JOB` prints it. The served figures then check the choice under the load it was
made for, through the daemon's HTTP API.

How to read it on this machine: the two deploys measure the same two candidates seconds apart,
so their figures for one candidate show the measurement's own noise. In earlier runs at load
averages of 5 to 9 (other work sharing the 2 cores) they differed by up to 2.7× (OpenVINO's
single-call median 2.1 against 5.7 ms); the latency objective picked onnxruntime in all three
earlier runs and in the table's, the throughput objective OpenVINO in two of three earlier runs
and in the table's (by 3 %), by margins (2–45 %) within that noise. Served over HTTP the two picks gave requests/s within 10 % of each other either way: the
HTTP handling and the codec share the same two cores, which autotune's in-worker measurement
leaves out."""

PEERS = """\
Binary tensors help KServe's ModelServer little on the CNN: `InferRequest.from_bytes` (kserve
0.21) turns every binary input into a Python list (`set_data_from_numpy(..., binary_data=False)`)
before the model sees it, ≈ 7 ms for the 27,648 floats of one [1,3,48,192] image on this machine
(timed alone in KServe's own virtual environment), and the model's `as_numpy()` turns the list
back; KServe's trace then shows ≈ 1 ms of `predict` in a request of 15–40 ms. The agent reads
the bytes with `np.frombuffer`. MLServer and the FastAPI app are measured with JSON only: the
app takes what its users' apps take (a pydantic model of the JSON request), and MLServer's REST
server reads JSON requests only (its binary tensor code is in its batch client, `mlserver infer`)."""
