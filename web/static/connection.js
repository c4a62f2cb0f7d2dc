// A WebSocket that reconnects by itself with capped exponential backoff and full jitter.
//
// Events (all CustomEvent, data in `detail`):
//   "state"   {state, attempt, delay}  state: "connecting" | "open" | "waiting" | "stopped"
//   "open"    {}                       the socket is open (log in now)
//   "message" {data}                   one text frame
//   "close"   {code, reason, wasOpen}  the socket closed (a retry is already scheduled)

export const BASE_DELAY_MS = 500;
export const MAX_DELAY_MS = 10_000;
const CONNECT_TIMEOUT_MS = 10_000;

/**
 * Delay before retry number `attempt` (0-based): a uniform random pick in
 * [0, min(max, base * 2^attempt)) ("full jitter"), so that many clients dropped by the same
 * gateway do not all come back at the same instant.
 */
export function backoffDelay(attempt, base = BASE_DELAY_MS, max = MAX_DELAY_MS, random = Math.random) {
  const ceiling = Math.min(max, base * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

export class ReconnectingSocket extends EventTarget {
  /** @param {string} url the ws:// or wss:// URL */
  constructor(url) {
    super();
    this.url = url;
    this.ws = null;
    this.attempt = 0;
    this.running = false;
    this.retryTimer = null;
    this.connectTimer = null;
    this.onOnline = () => this.retryNow();
  }

  /** Start connecting; keeps reconnecting until stop(). */
  start() {
    if (this.running) return;
    this.running = true;
    this.attempt = 0;
    window.addEventListener("online", this.onOnline);
    this.connect();
  }

  /** Close for good (no reconnect). */
  stop() {
    this.running = false;
    window.removeEventListener("online", this.onOnline);
    clearTimeout(this.retryTimer);
    clearTimeout(this.connectTimer);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      ws.close(1000, "bye");
    }
    this.emit("state", { state: "stopped", attempt: this.attempt, delay: 0 });
  }

  /** Call once the server accepted us, so the next loss retries quickly again. */
  resetBackoff() {
    this.attempt = 0;
  }

  /** Send an object as JSON; returns false when the socket is not open. */
  send(obj) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(obj));
    return true;
  }

  get isOpen() {
    return !!this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  /** Drop the current connection (it looks dead); the usual backoff retry follows. */
  drop() {
    if (this.ws) this.ws.close(4000, "no answer");
  }

  /** Skip the wait (e.g. the browser came back online). */
  retryNow() {
    if (this.running && !this.ws) {
      clearTimeout(this.retryTimer);
      this.connect();
    }
  }

  connect() {
    this.emit("state", { state: "connecting", attempt: this.attempt, delay: 0 });
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      // A malformed URL throws synchronously; report it like a failed attempt.
      this.emit("close", { code: 0, reason: String(err.message || err), wasOpen: false });
      this.scheduleRetry();
      return;
    }
    this.ws = ws;
    let wasOpen = false;
    this.connectTimer = setTimeout(() => ws.close(), CONNECT_TIMEOUT_MS);
    ws.onopen = () => {
      clearTimeout(this.connectTimer);
      wasOpen = true;
      this.emit("state", { state: "open", attempt: this.attempt, delay: 0 });
      this.emit("open", {});
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") this.emit("message", { data: ev.data });
    };
    ws.onerror = () => {}; // always followed by onclose
    ws.onclose = (ev) => {
      clearTimeout(this.connectTimer);
      if (this.ws !== ws) return;
      this.ws = null;
      this.emit("close", { code: ev.code, reason: ev.reason, wasOpen });
      this.scheduleRetry();
    };
  }

  scheduleRetry() {
    if (!this.running) return;
    const delay = backoffDelay(this.attempt);
    this.emit("state", { state: "waiting", attempt: this.attempt + 1, delay });
    this.attempt += 1;
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
