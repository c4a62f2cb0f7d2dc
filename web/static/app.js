// The chat page: wires the login form, the reconnecting socket, the protocol and the view.

import config from "./config.js";
import { ReconnectingSocket } from "./connection.js";
import { MAX_CONTENT, MAX_NAME, charCount, loginMessage, parseMessage, resumeField, sayMessage } from "./protocol.js";
import { View, localTimestamp } from "./view.js";

const WS_RE = /^wss?:\/\/[^\s/]+/i;
const LOGIN_TIMEOUT_MS = 10_000; // no user_list this long after login: drop and reconnect

/**
 * The WebSocket URL: `?ws=ws://host:port` in the page URL wins, then the value the server
 * injected in /config.js (`python -m web --ws-url`), then ws://<this page's host>:7272.
 */
export function resolveWsUrl(loc = window.location, cfg = config) {
  const param = new URLSearchParams(loc.search).get("ws");
  if (param && WS_RE.test(param)) return param;
  if (cfg && typeof cfg.wsUrl === "string" && WS_RE.test(cfg.wsUrl)) return cfg.wsUrl;
  const scheme = loc.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${loc.hostname || "127.0.0.1"}:7272`;
}

class ChatApp {
  constructor(view, url) {
    this.view = view;
    this.url = url;
    this.socket = null;
    this.name = "";
    this.room = "";
    // "login": the form is shown; "joining": login sent (or about to be), waiting for user_list;
    // "chat": logged in.
    this.phase = "login";
    this.hasJoined = false; // joined at least once in this session (so a later join is a rejoin)
    this.users = new Map(); // uid -> name, online users in join order
    this.names = new Map(); // uid -> name, everyone seen, to name senders who already left
    this.selfUid = null;
    this.selfCandidates = null;
    this.pending = []; // events that arrived before our user_list
    this.recipient = "all"; // "all", a uid, or {gone: name}
    this.unread = 0;
    this.token = null; // the member token of the last user_list: a reconnect carries on with it
    this.position = null; // {epoch, offset} of the last room message shown
    this.loginTimer = null;
    this.baseTitle = document.title;
  }

  init() {
    const v = this.view;
    v.serverUrl.textContent = this.url;
    v.nameInput.maxLength = MAX_NAME;
    v.roomInput.maxLength = MAX_NAME;
    v.messageInput.maxLength = MAX_CONTENT;
    try {
      v.nameInput.value = localStorage.getItem("chat.name") || "";
      v.roomInput.value = localStorage.getItem("chat.room") || "";
    } catch {
      // storage disabled: start empty
    }
    v.loginForm.addEventListener("submit", (e) => {
      e.preventDefault();
      this.join(v.nameInput.value, v.roomInput.value);
    });
    v.leaveButton.addEventListener("click", () => this.leave());
    v.retryButton.addEventListener("click", () => this.socket?.retryNow());
    v.composer.addEventListener("submit", (e) => {
      e.preventDefault();
      this.sendMessage();
    });
    v.messageInput.addEventListener("keydown", (e) => {
      // Enter sends; Shift+Enter falls through and inserts a new line; never while an IME
      // composition is open.
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
        e.preventDefault();
        v.composer.requestSubmit();
      }
    });
    v.recipient.addEventListener("change", () => {
      this.recipient = v.recipient.value === "all" ? "all" : Number(v.recipient.value);
      v.composer.classList.toggle("is-private", this.recipient !== "all");
      v.setComposerStatus("");
    });
    v.users.addEventListener("click", (e) => {
      const button = e.target.closest("button[data-uid]");
      if (!button) return;
      this.recipient = Number(button.dataset.uid);
      this.renderUsers();
      v.messageInput.focus();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) this.setUnread(0);
    });
    v.setStatus("idle", "Not connected");
    v.showLogin();
  }

  join(rawName, rawRoom) {
    const name = rawName.trim();
    const room = rawRoom.trim();
    if (!name) return this.view.showLogin("Please enter a nickname.");
    if (charCount(name) > MAX_NAME) return this.view.showLogin(`A nickname has at most ${MAX_NAME} characters.`);
    if (charCount(room) > MAX_NAME) return this.view.showLogin(`A room name has at most ${MAX_NAME} characters.`);
    try {
      localStorage.setItem("chat.name", name);
      localStorage.setItem("chat.room", room);
    } catch {
      // storage disabled: nothing to remember
    }
    this.name = name;
    this.room = room;
    this.phase = "joining";
    this.hasJoined = false;
    this.selfUid = null;
    this.token = null;
    this.position = null;
    this.users.clear();
    this.recipient = "all";
    this.view.clearMessages();
    this.renderUsers();
    this.view.showChat(name, room);
    this.socket = new ReconnectingSocket(this.url);
    this.socket.addEventListener("state", (e) => this.onState(e.detail));
    this.socket.addEventListener("open", () => this.onOpen());
    this.socket.addEventListener("message", (e) => this.onFrame(e.detail.data));
    this.socket.addEventListener("close", (e) => this.onClose(e.detail));
    this.socket.start();
  }

  leave(error = "") {
    clearTimeout(this.loginTimer);
    this.socket?.stop();
    this.socket = null;
    this.phase = "login";
    this.users.clear();
    this.view.setStatus("idle", "Not connected");
    this.view.setComposerStatus("");
    this.view.showLogin(error);
    this.setUnread(0);
  }

  onState({ state, attempt, delay }) {
    const v = this.view;
    if (state === "connecting") v.setStatus("connecting", attempt ? `Reconnecting (attempt ${attempt})…` : "Connecting…");
    else if (state === "open") v.setStatus("joining", "Logging in…");
    else if (state === "waiting") v.setStatus("waiting", `Disconnected, retrying in ${(delay / 1000).toFixed(1)} s`);
  }

  onOpen() {
    this.phase = "joining";
    this.pending = [];
    this.socket.send(loginMessage(this.name, this.room, resumeField(this.token, this.position)));
    clearTimeout(this.loginTimer);
    const socket = this.socket;
    this.loginTimer = setTimeout(() => {
      if (this.socket === socket && this.phase === "joining") socket.drop();
    }, LOGIN_TIMEOUT_MS);
  }

  onClose({ code, wasOpen }) {
    if (this.phase === "chat") {
      this.phase = "joining";
      // The close code means nothing to a reader (1006, 1012...): say what happens instead.
      this.system("Connection lost. Reconnecting…");
      this.renderUsers(true);
    } else if (!wasOpen && !this.hasJoined && this.socket?.attempt === 0) {
      this.system(`Cannot reach the chat server at ${this.url}; retrying…`);
    }
  }

  onFrame(data) {
    const msg = parseMessage(data);
    if (!msg) return; // not JSON or not a message we know: ignore, never render raw frames
    if (msg.type === "error") return this.onError(msg);
    if (msg.type === "user_list") return this.onUserList(msg);
    if (this.phase !== "chat") {
      this.pending.push(msg); // replayed once our user_list is in
      return;
    }
    this.onEvent(msg);
  }

  onError({ code, message }) {
    const text = message || code || "error";
    if (this.phase === "joining") {
      // The server refused our login (bad_name, ...): back to the form, no reconnect loop.
      this.leave(`The server refused this login: ${text}${code ? ` (${code})` : ""}`);
      return;
    }
    this.view.addMessage("error", { time: localTimestamp(), tag: "error", text: code ? `${text} (${code})` : text });
    this.view.setComposerStatus(text, true);
  }

  onUserList(list) {
    const users = list.users;
    clearTimeout(this.loginTimer);
    const rejoin = this.hasJoined;
    if (list.token) this.token = list.token;
    if (list.recovered === false || !this.position) this.position = list.position;
    this.phase = "chat";
    this.hasJoined = true;
    this.socket.resetBackoff();
    this.users = new Map(users.map((u) => [u.uid, u.name]));
    for (const [uid, name] of this.users) this.names.set(uid, name);
    // Our own uid: the user_list includes us. If exactly one entry carries our name it is us.
    // Otherwise (same name used twice) it is the uid of the first later `login` event with our
    // name whose uid is in this list: users who join after the list was built cannot be in it,
    // and the others in it logged in before us, so their login events were never sent to us.
    const mine = users.filter((u) => u.name === this.name).map((u) => u.uid);
    this.selfUid = list.uid ?? (mine.length === 1 ? mine[0] : null);
    this.selfCandidates = this.selfUid === null && mine.length > 1 ? new Set(mine) : null;
    // Every uid changes on a reconnect: keep a private recipient by name if still unambiguous.
    if (rejoin && this.recipient !== "all") {
      const oldName = typeof this.recipient === "object" ? this.recipient.gone : this.names.get(this.recipient);
      const same = users.filter((u) => u.name === oldName && u.uid !== this.selfUid);
      if (!this.users.has(this.recipient)) this.recipient = same.length === 1 ? same[0].uid : { gone: oldName };
    }
    this.renderUsers();
    this.view.setStatus("online", "Connected");
    this.view.setComposerStatus("");
    if (rejoin) {
      const missed = list.missed ? ` ${list.missed} missed message${list.missed === 1 ? "" : "s"} follow.` : "";
      this.system(`Reconnected. ${users.length} online.${list.recovered ? missed : ""}`);
      if (list.recovered === false) {
        this.system("Some messages from while you were away could not be recovered: the chat above may have gaps.");
      }
    }
    const pending = this.pending;
    this.pending = [];
    for (const msg of pending) this.onEvent(msg);
  }

  onEvent(msg) {
    const at = msg.position;
    if (at) {
      // Positions only grow within an epoch: one not past the last shown was shown already.
      const last = this.position;
      if (last && last.epoch === at.epoch && at.offset <= last.offset) return;
      this.position = at;
    }
    switch (msg.type) {
      case "login": {
        if (this.selfUid === null && msg.name === this.name && this.selfCandidates?.has(msg.uid)) {
          this.selfUid = msg.uid;
          this.selfCandidates = null;
        }
        this.users.set(msg.uid, msg.name);
        this.names.set(msg.uid, msg.name);
        this.renderUsers();
        const mine = msg.uid === this.selfUid;
        this.view.addMessage("login", { time: msg.time, tag: "joined", from: msg.name, text: mine ? "joined the chat (you)" : "joined the chat", mine });
        break;
      }
      case "logout": {
        this.users.delete(msg.uid);
        this.names.set(msg.uid, msg.name);
        if (this.recipient === msg.uid) this.recipient = { gone: msg.name };
        this.renderUsers();
        this.view.addMessage("logout", { time: msg.time, tag: "left", from: msg.name, text: "left the chat" });
        break;
      }
      case "back": {
        // A member who never left resumed: no line, but make sure it is listed (our own
        // user_list may have been read before its gateway's members were parked again).
        if (!this.users.has(msg.uid)) {
          this.users.set(msg.uid, msg.name);
          this.names.set(msg.uid, msg.name);
          this.renderUsers();
        }
        break;
      }
      case "say":
        this.onSay(msg);
        break;
      default:
        break;
    }
  }

  onSay({ from, to, content, time }) {
    const mine = from === this.selfUid;
    const fromName = this.names.get(from) ?? `#${from}`;
    let toText = "";
    if (to !== "all") {
      toText = mine || to !== this.selfUid ? `to ${this.names.get(to) ?? `#${to}`}` : "to you";
    }
    this.view.addMessage("say", { time, from: fromName, to: toText, text: content, tag: to === "all" ? "" : "private", mine });
    if (document.hidden) this.setUnread(this.unread + 1);
  }

  sendMessage() {
    const v = this.view;
    const content = v.messageInput.value;
    if (!content.trim()) return;
    if (charCount(content) > MAX_CONTENT) {
      v.setComposerStatus(`A message has at most ${MAX_CONTENT} characters.`, true);
      return;
    }
    if (this.phase !== "chat" || !this.socket?.isOpen) {
      v.setComposerStatus("Not connected: your message is kept, send it again once connected.", true);
      return;
    }
    if (typeof this.recipient === "object") {
      v.setComposerStatus(`${this.recipient.gone} has left: choose a recipient.`, true);
      v.recipient.focus();
      return;
    }
    this.socket.send(sayMessage(this.recipient, content));
    v.messageInput.value = "";
    v.setComposerStatus("");
  }

  renderUsers(stale = false) {
    const users = [...this.users].map(([uid, name]) => ({ uid, name }));
    this.view.renderUsers(users, this.selfUid, stale);
    this.view.renderRecipients(users, this.selfUid, this.recipient);
  }

  system(text) {
    this.view.addMessage("system", { time: localTimestamp(), tag: "info", text });
  }

  setUnread(n) {
    this.unread = n;
    document.title = n ? `(${n}) ${this.baseTitle}` : this.baseTitle;
  }
}

const app = new ChatApp(new View(), resolveWsUrl());
app.init();
