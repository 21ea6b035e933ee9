#!/usr/bin/env node
/*
 * An independent fdcluster target: Node.js, HANDOFF model with an ACKNOWLEDGED handoff.
 *
 *   node node_handoff_server.js --port N --workers W [--host 127.0.0.1] [--max-frame BYTES]
 *                               [--idle-timeout S] [--write-timeout S] [--grace S]
 *
 * Model: the primary alone accepts (net.createServer({pauseOnConnect: true})) and hands each
 * socket to a worker over the cluster IPC channel, round-robin, keeping its own copy
 * ({keepOpen: true}) until the worker acknowledges it.  A worker acknowledges a socket before
 * it reads a byte from it; a worker that dies (or starts draining) before acknowledging gives
 * its sockets back, and the primary hands them to a live worker.  Only an acknowledged socket's
 * copy is closed in the primary, so the primary holds no client socket once its handoff is
 * acknowledged.  The primary keeps the listening socket whatever happens to the workers.
 *
 * Declared capabilities:
 * - strategy: round-robin handoff over worker slots; a slot whose worker is still starting keeps
 *   its turn (up to 3 s); a worker with 4 unacknowledged handoffs keeps its turn 200 ms, then is
 *   skipped until it acknowledges one (a frozen worker gets no more than those 4);
 * - respawns dead workers: yes, with a bounded back-off for crash loops (0.2 s doubling to 5 s); a fork
 *   that fails (out of descriptors for its IPC channel, out of processes) is retried with the same back-off;
 * - drains on SIGTERM (primary or worker) and SIGINT: yes, within --grace (5 s), exit 0;
 * - idle timeout: --idle-timeout (30 s; 0 = off): no complete frame for that long closes the connection;
 * - max frame: --max-frame (1 MiB): a larger length prefix gets an error frame, then a clean close;
 * - back-pressure: a client that does not read is not read past 1 MiB of pending output and is
 *   closed after --write-timeout (10 s);
 * - workers die with the primary (the IPC channel's disconnect);
 * - EMFILE in a worker: the descriptor does not arrive (Node's NODE_HANDLE_NACK); the primary still
 *   holds the socket, skips that worker for a back-off (50 ms doubling to 1 s) and hands it on;
 * - EMFILE in the primary: libuv sheds the backlog with its reserve descriptor (no spin, but those
 *   clients are reset: Node cannot pause accepting); the error is logged, accepting goes on.  Node
 *   raises its own soft descriptor limit to the hard one at start-up, so this needs a low hard limit.
 *
 * No npm dependencies.  Logs go to stderr; stdout carries only the ready line.
 */
'use strict';

const cluster = require('node:cluster');
const net = require('node:net');

const HEADER_SIZE = 4;
const HIGH_WATER = 1 << 20;
const HANDOFF_WINDOW = 4;
const MAX_DEPTH = 512;
const STARTING_TURN_MS = 3000;
const STALLED_TURN_MS = 200;
const CRASH_WINDOW_MS = 1000;
const RESPAWN_BACKOFF_MAX_MS = 5000;
const ACCEPT_FLUSH_MS = 50;
const LINGER_MS = 1000;
const DRAIN_QUIET_MS = 50;
const FULL_BACKOFF_MS = [50, 1000]; // a worker that could not take a descriptor is skipped this long, doubling
const EXIT_USAGE = 2;
const EXIT_LISTEN_FAILED = 1;
const READY_TAG = 'fdcluster-ready';
const MSG = { READY: 'ready', CONN: 'conn', ACK: 'ack', REJECT: 'reject', DRAINING: 'draining' };

function log(message) {
  process.stderr.write(`[node-handoff ${cluster.isPrimary ? 'primary' : 'worker'} ${process.pid}] ${message}\n`);
}

// ---------------------------------------------------------------- command line ----

const FLAGS = {
  '--host': ['host', String, '127.0.0.1'],
  '--port': ['port', 'int', null],
  '--workers': ['workers', 'int', 2],
  '--max-frame': ['maxFrame', 'int', 1 << 20],
  '--idle-timeout': ['idleTimeout', 'seconds', 30],
  '--write-timeout': ['writeTimeout', 'seconds', 10],
  '--grace': ['grace', 'seconds', 5],
  '--backlog': ['backlog', 'int', 1024],
};

function usage(message) {
  process.stderr.write(`usage: node node_handoff_server.js --port N --workers W [${Object.keys(FLAGS).slice(2).join(' X] [')} X]\n`);
  process.stderr.write(`error: ${message}\n`);
  process.exit(EXIT_USAGE);
}

function parseArgs(argv) {
  const options = {};
  for (const [name, , fallback] of Object.values(FLAGS)) options[name] = fallback;
  for (let i = 0; i < argv.length; i++) {
    let [flag, value] = argv[i].split(/=(.*)/s);
    if (!(flag in FLAGS)) usage(`unrecognized argument: ${argv[i]}`);
    if (value === undefined) value = argv[++i];
    if (value === undefined) usage(`${flag} needs a value`);
    const [name, kind] = FLAGS[flag];
    if (kind === 'int') {
      if (!/^\d+$/.test(value)) usage(`${flag} must be a non-negative integer, got '${value}'`);
      options[name] = Number(value);
    } else if (kind === 'seconds') {
      if (!/^\d+(\.\d+)?$/.test(value)) usage(`${flag} must be a non-negative number of seconds, got '${value}'`);
      options[name] = Number(value);
    } else {
      options[name] = value;
    }
  }
  if (options.port === null || options.port > 65535) usage('--port N (0-65535) is required');
  if (options.workers < 1) usage('--workers must be at least 1');
  if (options.maxFrame < 1) usage('--max-frame must be at least 1');
  return options;
}

// ---------------------------------------------------------------- primary ----

function runPrimary(opt) {
  const slots = new Array(opt.workers).fill(null); // index -> live worker record or null
  const crashes = new Array(opt.workers).fill(0);
  const respawnTimers = new Set();
  const queue = []; // accepted sockets no worker holds yet, oldest first
  let turn = 0;
  let nextId = 0;
  let listening = false;
  let announced = false;
  let stopping = false;
  let serverClosed = false;
  let workersTold = false;
  let holdTimer;

  const server = net.createServer({ pauseOnConnect: true }, (socket) => {
    socket.on('error', () => {}); // a reset while queued: the worker that gets it sees the error
    queue.push(socket);
    distribute();
  });
  server.on('error', (err) => {
    if (!listening) {
      log(`cannot listen on ${opt.host}:${opt.port}: ${err.code}`);
      process.exit(EXIT_LISTEN_FAILED);
    }
    log(`accept: ${err.code}`); // EMFILE and the like: libuv already shed the backlog; keep accepting
  });

  function spawnWorker(index) {
    const startedAt = Date.now();
    let worker;
    try {
      worker = cluster.fork();
    } catch (err) {
      scheduleRespawn(index, startedAt, `cannot start worker ${index}: ${err.code || err.message}`);
      return;
    }
    const rec = {
      index, worker, ready: false, draining: false, retired: false, startedAt,
      inflight: new Map(), // handoff id -> our copy of the socket, until the worker acknowledges it
      delivering: [], // handoff ids in send order, until Node's own NODE_HANDLE_ACK / NACK for each
      fullUntil: 0, fullBackoff: FULL_BACKOFF_MS[0], stalledSince: 0,
    };
    slots[index] = rec;
    worker.on('error', (err) => {
      // A fork that failed (EMFILE, ENFILE, EAGAIN: no IPC socketpair or no process) has no pid and never
      // exits or disconnects, so it is retired here and retried after a back-off.  Any other error is a
      // send to a dying worker: its disconnect gives the sockets back.
      if (worker.process.pid !== undefined) return;
      delete cluster.workers[worker.id]; // Node forgets a worker only on its exit, which never comes
      retire(rec, `cannot start worker ${index}: ${err.code || err.message}`);
    });
    worker.on('message', (msg) => onMessage(rec, msg));
    // Node passes handles one at a time and the receiver answers each with NODE_HANDLE_ACK, or NACK when
    // the descriptor did not arrive (MSG_CTRUNC: the worker is out of descriptors).  With keepOpen Node
    // neither retries nor reports a NACK, so the socket would wait for an acknowledgement forever.
    worker.process.on('internalMessage', (msg) => {
      if (!msg || (msg.cmd !== 'NODE_HANDLE_ACK' && msg.cmd !== 'NODE_HANDLE_NACK')) return;
      const id = rec.delivering.shift();
      if (msg.cmd === 'NODE_HANDLE_ACK') {
        rec.fullBackoff = FULL_BACKOFF_MS[0];
        return;
      }
      const socket = rec.inflight.get(id);
      rec.inflight.delete(id);
      if (socket) queue.unshift(socket);
      rec.fullUntil = Date.now() + rec.fullBackoff;
      rec.fullBackoff = Math.min(rec.fullBackoff * 2, FULL_BACKOFF_MS[1]);
      log(`worker ${worker.process.pid} could not take a socket (out of descriptors?); handing it to another`);
      setTimeout(distribute, rec.fullUntil - Date.now() + 1);
      distribute();
    });
    worker.on('disconnect', () => retire(rec));
    worker.on('exit', (code, signal) => {
      log(`worker ${worker.process.pid} exited (${signal || `exit code ${code}`})`);
      if (!worker.isConnected()) retire(rec);
    });
  }

  function onMessage(rec, msg) {
    if (!msg || typeof msg !== 'object') return;
    if (msg.type === MSG.READY) {
      rec.ready = true;
      announce();
    } else if (msg.type === MSG.ACK) {
      rec.stalledSince = 0;
      const socket = rec.inflight.get(msg.id);
      rec.inflight.delete(msg.id);
      // destroy() closes our descriptor only: the worker's copy keeps the connection open, no FIN.
      if (socket) socket.destroy();
    } else if (msg.type === MSG.REJECT) {
      const socket = rec.inflight.get(msg.id);
      rec.inflight.delete(msg.id);
      if (socket) queue.unshift(socket);
    } else if (msg.type === MSG.DRAINING) {
      rec.draining = true;
    }
    distribute();
    maybeFinishStop();
  }

  /** The worker's channel is closed (or never opened): no acknowledgement can come, so take its sockets back. */
  function retire(rec, why) {
    if (rec.retired) return;
    rec.retired = true;
    if (slots[rec.index] === rec) slots[rec.index] = null;
    queue.unshift(...rec.inflight.values());
    rec.inflight.clear();
    scheduleRespawn(rec.index, rec.startedAt, why);
    distribute();
    maybeFinishStop();
  }

  /**
   * Fork slot ``index`` again, at once unless its workers die young (or cannot be forked at all: out of
   * descriptors or processes), then after a back-off (0.2 s doubling to 5 s), so a crash loop cannot spin.
   */
  function scheduleRespawn(index, startedAt, why) {
    if (stopping) return;
    crashes[index] = Date.now() - startedAt < CRASH_WINDOW_MS ? crashes[index] + 1 : 0;
    const delay = crashes[index] ? Math.min(100 * 2 ** crashes[index], RESPAWN_BACKOFF_MAX_MS) : 0;
    if (why) log(`${why}; retrying in ${delay} ms`);
    const timer = setTimeout(() => {
      respawnTimers.delete(timer);
      if (!stopping) spawnWorker(index);
    }, delay);
    respawnTimers.add(timer);
  }

  function announce() {
    if (announced || !listening || !slots.every((rec) => rec && rec.ready)) return;
    announced = true;
    const info = {
      host: opt.host, port: server.address().port, pid: process.pid,
      workers: slots.map((rec) => rec.worker.process.pid), strategy: 'round-robin-handoff',
    };
    process.stdout.write(`${READY_TAG} ${JSON.stringify(info)}\n`);
  }

  /** The next worker in turn, or null when the head of the queue must wait (an ack, a start, a respawn). */
  function pick() {
    const now = Date.now();
    for (let tried = 0; tried < slots.length; tried++) {
      const rec = slots[turn];
      let left = 0; // how much longer this turn is held for its worker
      if (rec && rec.ready && !rec.draining && rec.fullUntil <= now) {
        if (rec.inflight.size < HANDOFF_WINDOW) {
          rec.stalledSince = 0;
          turn = (turn + 1) % slots.length;
          return rec;
        }
        // A busy worker keeps its turn a little (fairness); a frozen one is skipped once that expires.
        if (!rec.stalledSince) rec.stalledSince = now;
        left = STALLED_TURN_MS - (now - rec.stalledSince);
      } else if (rec && !rec.ready) {
        left = STARTING_TURN_MS - (now - rec.startedAt); // so a respawned worker gets its share
      }
      if (left > 0 && !stopping) {
        clearTimeout(holdTimer);
        holdTimer = setTimeout(distribute, left);
        return null;
      }
      turn = (turn + 1) % slots.length;
    }
    return null; // every worker is dead, draining, out of descriptors or stalled past its turn
  }

  function distribute() {
    while (queue.length) {
      const rec = pick();
      if (!rec) return;
      const socket = queue.shift();
      if (socket.destroyed) continue;
      const id = ++nextId;
      rec.inflight.set(id, socket);
      rec.delivering.push(id);
      rec.worker.send({ type: MSG.CONN, id }, socket, { keepOpen: true }, (err) => {
        // A failed send with the worker still connected: take the socket back now.
        if (err && !rec.retired && rec.inflight.get(id) === socket) {
          rec.inflight.delete(id);
          rec.delivering = rec.delivering.filter((other) => other !== id);
          queue.unshift(socket);
          setImmediate(distribute);
        }
      });
    }
  }

  function live() {
    return slots.filter((rec) => rec !== null);
  }

  function stop() {
    if (stopping) return;
    stopping = true;
    for (const timer of respawnTimers) clearTimeout(timer);
    setTimeout(() => {
      for (const rec of live()) rec.worker.process.kill('SIGKILL');
      for (const socket of queue) socket.destroy();
      process.exit(0);
    }, opt.grace * 1000).unref();
    // Take what the kernel already queued on the listener before closing it.
    // (close() stops listening at once; its callback would wait for the workers' sockets, so it is not used.)
    setTimeout(() => {
      server.close();
      serverClosed = true;
      maybeFinishStop();
    }, ACCEPT_FLUSH_MS);
  }

  function maybeFinishStop() {
    if (!stopping || !serverClosed) return;
    const handing = queue.length > 0 || live().some((rec) => rec.inflight.size > 0);
    if (handing && live().some((rec) => !rec.draining)) return; // let every accepted socket reach a worker first
    for (const socket of queue.splice(0)) socket.destroy(); // nobody left to serve them
    if (!workersTold) {
      workersTold = true;
      for (const rec of live()) rec.worker.process.kill('SIGTERM');
    }
    if (live().length === 0) process.exit(0);
  }

  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  server.listen({ host: opt.host, port: opt.port, backlog: opt.backlog }, () => {
    listening = true;
    for (let i = 0; i < opt.workers; i++) spawnWorker(i);
  });
}

// ----------------------------------------------------------------- worker ----

class RequestError extends Error {}

const utf8 = new TextDecoder('utf-8', { fatal: true });
// Tokens of text JSON.parse already accepted; the string pattern is unrolled so long strings do not backtrack.
const TOKEN = /[ \t\r\n]+|"[^"\\]*(?:\\.[^"\\]*)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|[{}[\]:,]|true|false|null/y;

/** Reject what JSON.parse silently accepts but cannot echo faithfully: depth, duplicates, lone surrogates, numbers. */
function checkRequestText(text) {
  const stack = []; // a Set of keys per open object, null per open array
  let expectKey = false;
  TOKEN.lastIndex = 0;
  while (TOKEN.lastIndex < text.length) {
    const match = TOKEN.exec(text);
    if (!match) throw new RequestError('unexpected token');
    const token = match[0];
    const first = token[0];
    if (first === '{' || first === '[') {
      stack.push(first === '{' ? new Set() : null);
      if (stack.length > MAX_DEPTH) throw new RequestError(`nesting deeper than ${MAX_DEPTH}`);
      expectKey = first === '{';
    } else if (first === '}' || first === ']') {
      stack.pop();
      expectKey = false;
    } else if (first === ',') {
      expectKey = stack.length > 0 && stack[stack.length - 1] !== null;
    } else if (first === ':') {
      expectKey = false;
    } else if (first === '"') {
      let value = token.slice(1, -1);
      if (value.includes('\\')) {
        value = JSON.parse(token);
        if (!value.isWellFormed()) throw new RequestError('lone surrogate in a string');
      }
      if (expectKey) {
        const keys = stack[stack.length - 1];
        if (keys.has(value)) throw new RequestError('duplicate key in object');
        keys.add(value);
      }
    } else if (first === '-' || (first >= '0' && first <= '9')) {
      const number = Number(token);
      if (!Number.isFinite(number)) throw new RequestError(`number ${token.slice(0, 40)} is out of range`);
      if (!/[.eE]/.test(token) && !Number.isSafeInteger(number)) {
        throw new RequestError(`integer ${token.slice(0, 40)} cannot be represented exactly`);
      }
    }
  }
}

/** Length prefix and UTF-8 JSON in one buffer, written once (no concatenation copy). */
function encodeFrame(message) {
  const text = JSON.stringify(message);
  const frame = Buffer.allocUnsafe(HEADER_SIZE + Buffer.byteLength(text, 'utf8'));
  frame.writeUInt32LE(frame.length - HEADER_SIZE, 0);
  frame.write(text, HEADER_SIZE, 'utf8');
  return frame;
}

/** The response frame for one request body; never throws. */
function answer(body) {
  try {
    let text;
    try {
      text = utf8.decode(body);
    } catch (err) {
      throw new RequestError('invalid UTF-8');
    }
    let request;
    try {
      request = JSON.parse(text);
    } catch (err) {
      throw new RequestError(`malformed JSON: ${err.message}`);
    }
    checkRequestText(text);
    if (request === null || typeof request !== 'object' || Array.isArray(request)) {
      throw new RequestError(`request must be a JSON object, got ${Array.isArray(request) ? 'array' : typeof request}`);
    }
    if (typeof request.in !== 'string') throw new RequestError('request needs a string "in" naming the method');
    if (request.in !== 'ping') throw new RequestError(`unknown method '${request.in}'`);
    return encodeFrame({ out: 'pong', result: request.params === undefined ? null : request.params });
  } catch (err) {
    const why = err instanceof RequestError ? err.message : `cannot answer: ${err.name}`;
    return encodeFrame({ out: 'error', result: why });
  }
}

function runWorker(opt) {
  const connections = new Set();
  let draining = false;

  function serveConnection(socket) {
    const conn = { socket, buffer: Buffer.alloc(0), closing: false, paused: false, lastData: Date.now(),
      idleTimer: null, writeTimer: null, quietTimer: null };
    connections.add(conn);
    socket.setNoDelay(true);
    socket.on('data', (chunk) => onData(conn, chunk));
    socket.on('drain', () => {
      if (!conn.paused) return;
      conn.paused = false;
      clearTimeout(conn.writeTimer);
      socket.resume();
      if (draining) checkQuiescent(conn);
    });
    socket.on('end', () => { conn.closing = true; }); // allowHalfOpen is off: Node flushes, then ends our side
    socket.on('error', () => {});
    socket.on('close', () => {
      for (const timer of [conn.idleTimer, conn.writeTimer, conn.quietTimer]) clearTimeout(timer);
      connections.delete(conn);
      maybeExit();
    });
    armIdle(conn);
    if (draining) checkQuiescent(conn);
  }

  function onData(conn, chunk) {
    if (conn.closing) return; // after our FIN: read and discard, so closing never resets unread data
    conn.lastData = Date.now();
    let buffer = conn.buffer.length ? Buffer.concat([conn.buffer, chunk]) : chunk;
    const replies = [];
    let offset = 0;
    while (buffer.length - offset >= HEADER_SIZE) {
      const length = buffer.readUInt32LE(offset);
      if (length > opt.maxFrame) {
        replies.push(encodeFrame({ out: 'error', result: `frame of ${length} bytes exceeds the maximum of ${opt.maxFrame} bytes` }));
        conn.socket.write(Buffer.concat(replies));
        closeGracefully(conn);
        return;
      }
      const end = offset + HEADER_SIZE + length;
      if (end > buffer.length) break;
      replies.push(answer(buffer.subarray(offset + HEADER_SIZE, end)));
      offset = end;
    }
    conn.buffer = offset ? Buffer.from(buffer.subarray(offset)) : buffer;
    if (replies.length) {
      conn.socket.write(replies.length === 1 ? replies[0] : Buffer.concat(replies)); // pipelined replies in one write
      armIdle(conn);
    }
    if (conn.socket.writableLength > HIGH_WATER && !conn.paused) {
      // The client is not reading: stop reading it too, and give it writeTimeout to catch up.
      conn.paused = true;
      conn.socket.pause();
      conn.writeTimer = setTimeout(() => conn.socket.destroy(), opt.writeTimeout * 1000);
    }
    if (draining) checkQuiescent(conn);
  }

  function armIdle(conn) {
    clearTimeout(conn.idleTimer);
    if (opt.idleTimeout > 0) {
      conn.idleTimer = setTimeout(() => {
        if (!conn.paused) closeGracefully(conn); // a paused connection belongs to the write timer
      }, opt.idleTimeout * 1000);
    }
  }

  /** Flush, FIN, read and discard briefly, then close. */
  function closeGracefully(conn) {
    if (conn.closing) return;
    conn.closing = true;
    conn.buffer = Buffer.alloc(0);
    conn.socket.end();
    if (conn.paused) conn.socket.resume();
    setTimeout(() => conn.socket.destroy(), LINGER_MS).unref();
  }

  /** While draining: close once the connection has no incomplete frame, no backed-up output and has been quiet. */
  function checkQuiescent(conn) {
    if (conn.closing || conn.buffer.length || conn.paused) return; // its next data or drain calls back
    clearTimeout(conn.quietTimer);
    const quietFor = Date.now() - conn.lastData;
    if (quietFor >= DRAIN_QUIET_MS) return closeGracefully(conn);
    conn.quietTimer = setTimeout(() => checkQuiescent(conn), DRAIN_QUIET_MS - quietFor);
  }

  function maybeExit() {
    if (draining && connections.size === 0) process.exit(0);
  }

  function drain() {
    if (draining) return;
    draining = true;
    if (process.connected) process.send({ type: MSG.DRAINING });
    setTimeout(() => process.exit(0), opt.grace * 1000).unref();
    // After this poll phase, so data already in the kernel for our sockets has been read.
    setImmediate(() => {
      for (const conn of connections) checkQuiescent(conn);
      maybeExit();
    });
  }

  process.on('message', (msg, socket) => {
    if (!msg || msg.type !== MSG.CONN || !socket) return;
    if (draining) {
      // Not ours to serve: stop the read this handle started on creation (nothing was read yet) and give it back.
      socket.pause();
      if (process.connected) process.send({ type: MSG.REJECT, id: msg.id });
      socket.destroy();
      return;
    }
    // Acknowledge before reading a byte: from here on, a death of ours loses only what we hold.
    if (process.connected) process.send({ type: MSG.ACK, id: msg.id });
    serveConnection(socket);
  });
  process.on('SIGTERM', drain);
  process.on('SIGINT', drain);
  process.on('disconnect', () => process.exit(0)); // the primary is gone: so are we
  process.on('error', () => {}); // a send racing the primary's death: the disconnect above ends us
  process.send({ type: MSG.READY });
}

const options = parseArgs(process.argv.slice(2));
if (cluster.isPrimary) runPrimary(options);
else runWorker(options);
