#!/usr/bin/env node
/*
 * A non-Python fdcluster target: a Node.js cluster speaking the framed JSON protocol.
 *
 *   node node_cluster_server.js --port N --workers W [--host 127.0.0.1]
 *
 * The primary accepts connections and hands each socket to a worker
 * (cluster.SCHED_RR, the same handoff model as the reference server); every
 * worker serves the protocol: a frame is a 4-byte little-endian length then
 * UTF-8 JSON; `ping` echoes its params; malformed or unknown requests get an
 * error frame and the connection stays usable; a frame over 1 MiB gets an
 * error frame and the connection is closed.  Dead workers are respawned.
 * SIGTERM (or SIGINT): stop accepting, stop the workers, exit 0.
 *
 * No npm dependencies.  Logs go to stderr; stdout stays silent, as an
 * external target's would.
 */
'use strict';

const cluster = require('node:cluster');
const net = require('node:net');

// Must be set before the first fork; the environment could otherwise override it.
cluster.schedulingPolicy = cluster.SCHED_RR;

const MAX_FRAME = 1 << 20;
const HEADER_SIZE = 4;
const EXIT_USAGE = 2;
const EXIT_LISTEN_FAILED = 1;
const SHUTDOWN_TIMEOUT_MS = 3000;
const MSG_LISTEN_ERROR = 'fdcluster-listen-error';

function log(message) {
  process.stderr.write(`[node-cluster ${cluster.isPrimary ? 'primary' : 'worker'} ${process.pid}] ${message}\n`);
}

function usage(message) {
  process.stderr.write('usage: node node_cluster_server.js --port N --workers W [--host HOST]\n');
  process.stderr.write(`error: ${message}\n`);
  process.exit(EXIT_USAGE);
}

function parseArgs(argv) {
  const options = { host: '127.0.0.1', port: null, workers: null };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = argv[i + 1];
    if (!['--port', '--workers', '--host'].includes(flag)) usage(`unrecognized argument: ${flag}`);
    if (value === undefined) usage(`${flag} needs a value`);
    i++;
    if (flag === '--host') {
      options.host = value;
      continue;
    }
    if (!/^\d+$/.test(value)) usage(`${flag} must be a non-negative integer, got '${value}'`);
    options[flag.slice(2)] = Number(value);
  }
  if (options.port === null || options.port > 65535) usage('--port N (0-65535) is required');
  if (options.workers === null || options.workers < 1) usage('--workers W (at least 1) is required');
  return options;
}

// ---------------------------------------------------------------- primary ----

function runPrimary(options) {
  let shuttingDown = false;

  function spawnWorker() {
    const worker = cluster.fork();
    worker.on('message', (message) => {
      // A worker that cannot listen means nobody can: give up instead of respawning forever.
      if (message && message.type === MSG_LISTEN_ERROR) {
        log(`listen ${message.code} on ${options.host}:${options.port}: ${message.message}`);
        shutdown(EXIT_LISTEN_FAILED);
      }
    });
    return worker;
  }

  function liveWorkers() {
    return Object.values(cluster.workers).filter((worker) => worker && !worker.isDead());
  }

  function shutdown(code) {
    if (shuttingDown) return;
    shuttingDown = true;
    const workers = liveWorkers();
    for (const worker of workers) worker.process.kill('SIGTERM');
    const finish = () => process.exit(code);
    if (workers.length === 0) return finish();
    const timer = setTimeout(() => {
      for (const worker of liveWorkers()) worker.process.kill('SIGKILL');
      finish();
    }, SHUTDOWN_TIMEOUT_MS);
    cluster.on('exit', () => {
      if (liveWorkers().length === 0) {
        clearTimeout(timer);
        finish();
      }
    });
  }

  cluster.on('exit', (worker, code, signal) => {
    if (shuttingDown) return;
    log(`worker ${worker.process.pid} died (${signal || `exit code ${code}`}); respawning`);
    spawnWorker();
  });

  process.on('SIGTERM', () => shutdown(0));
  process.on('SIGINT', () => shutdown(0));

  // Announce readiness once every worker is listening: a forked worker that has not
  // registered with the primary's round-robin handle yet cannot be handed anything.
  const listening = new Set();
  let announced = false;
  cluster.on('listening', (worker, address) => {
    listening.add(worker.id);
    if (announced || listening.size < options.workers) return;
    announced = true;
    const info = {
      host: options.host, port: address.port, pid: process.pid,
      workers: liveWorkers().map((w) => w.process.pid), strategy: 'node-cluster-rr', control: null,
    };
    process.stdout.write(`fdcluster-ready ${JSON.stringify(info)}\n`);
  });
  cluster.on('exit', (worker) => listening.delete(worker.id));

  for (let i = 0; i < options.workers; i++) spawnWorker();
  log(`forked ${options.workers} workers for ${options.host}:${options.port}`);
}

// ----------------------------------------------------------------- worker ----

const utf8 = new TextDecoder('utf-8', { fatal: true });

function encodeFrame(message) {
  const body = Buffer.from(JSON.stringify(message), 'utf8');
  const header = Buffer.allocUnsafe(HEADER_SIZE);
  header.writeUInt32LE(body.length, 0);
  return Buffer.concat([header, body]);
}

function errorFrame(message) {
  return encodeFrame({ out: 'error', result: message });
}

function describeType(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'list';
  return typeof value;
}

/** Answer one frame body; returns the response frame. */
function serve(body) {
  let text;
  try {
    text = utf8.decode(body);
  } catch (err) {
    return errorFrame('invalid UTF-8');
  }
  let request;
  try {
    request = JSON.parse(text);
  } catch (err) {
    return errorFrame(`malformed JSON: ${err.message}`);
  }
  if (request === null || typeof request !== 'object' || Array.isArray(request)) {
    return errorFrame(`request must be a JSON object, got ${describeType(request)}`);
  }
  if (typeof request.in !== 'string') {
    return errorFrame('request needs a string "in" field naming the method');
  }
  const params = request.params === undefined ? null : request.params;
  switch (request.in) {
    case 'ping':
      return encodeFrame({ out: 'pong', result: params });
    default:
      return errorFrame(`unknown method '${request.in}'`);
  }
}

function handleConnection(socket, sockets) {
  sockets.add(socket);
  socket.setNoDelay(true);
  let buffer = Buffer.alloc(0);
  let dead = false;

  socket.on('data', (chunk) => {
    if (dead) return;
    buffer = buffer.length ? Buffer.concat([buffer, chunk]) : chunk;
    let offset = 0;
    while (buffer.length - offset >= HEADER_SIZE) {
      const length = buffer.readUInt32LE(offset);
      if (length > MAX_FRAME) {
        // The stream cannot be resynchronised: say why, then close after the write.
        dead = true;
        socket.end(errorFrame(`frame of ${length} bytes exceeds the maximum of ${MAX_FRAME} bytes`));
        buffer = Buffer.alloc(0);
        return;
      }
      const end = offset + HEADER_SIZE + length;
      if (end > buffer.length) break;
      socket.write(serve(buffer.subarray(offset + HEADER_SIZE, end)));
      offset = end;
    }
    buffer = offset ? buffer.subarray(offset) : buffer;
    // A client that pipelines without reading must not grow our write buffer without bound.
    if (socket.writableNeedDrain) socket.pause();
  });
  socket.on('drain', () => {
    if (!dead) socket.resume();
  });
  socket.on('end', () => socket.end());
  socket.on('error', () => {});
  socket.on('close', () => sockets.delete(socket));
}

function runWorker(options) {
  const sockets = new Set();
  const server = net.createServer((socket) => handleConnection(socket, sockets));
  server.on('error', (err) => {
    process.send({ type: MSG_LISTEN_ERROR, code: err.code, message: err.message });
    process.exitCode = EXIT_LISTEN_FAILED;
    setImmediate(() => process.disconnect());
  });
  server.listen({ host: options.host, port: options.port });

  const stop = () => {
    server.close();
    for (const socket of sockets) socket.destroy();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  // The primary is gone (killed): nobody will hand us sockets or reap us.
  process.on('disconnect', () => process.exit(0));
}

const options = parseArgs(process.argv.slice(2));
if (cluster.isPrimary) runPrimary(options);
else runWorker(options);
