// DOM rendering. Every name and message goes through textContent (via el()); nothing here ever
// assigns innerHTML, so chat data is shown as text and can never become markup or script.

const MAX_MESSAGES = 500;
const TIME_RE = /^\d{4}-\d{2}-\d{2} (\d{2}:\d{2}:\d{2})$/;

/** createElement + className + textContent + attributes. */
export function el(tag, { cls, text, attrs } = {}, children = []) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  if (attrs) for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) if (child) node.append(child);
  return node;
}

const pad = (n) => String(n).padStart(2, "0");

/** The local time now as "YYYY-MM-DD HH:MM:SS" (for events without a server time). */
export function localTimestamp(d = new Date()) {
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
  );
}

/** A <time> showing HH:MM:SS, with the full server timestamp in datetime/title. */
function timeNode(stamp) {
  const full = TIME_RE.test(stamp) ? stamp : localTimestamp();
  return el("time", {
    cls: "msg-time",
    text: full.match(TIME_RE)[1],
    attrs: { datetime: full, title: full },
  });
}

export class View {
  constructor(doc = document) {
    const $ = (id) => doc.getElementById(id);
    this.doc = doc;
    this.loginView = $("login-view");
    this.loginForm = $("login-form");
    this.nameInput = $("name");
    this.roomInput = $("room");
    this.loginError = $("login-error");
    this.joinButton = $("join");
    this.serverUrl = $("server-url");
    this.chatView = $("chat-view");
    this.messages = $("messages");
    this.users = $("users");
    this.userCount = $("user-count");
    this.composer = $("composer");
    this.recipient = $("to");
    this.messageInput = $("message");
    this.composerStatus = $("composer-status");
    this.status = $("status");
    this.statusText = $("status-text");
    this.retryButton = $("retry");
    this.whoami = $("whoami");
    this.meName = $("me-name");
    this.meRoom = $("me-room");
    this.leaveButton = $("leave");
  }

  showLogin(error = "") {
    this.chatView.hidden = true;
    this.whoami.hidden = true;
    this.loginView.hidden = false;
    this.loginError.textContent = error;
    this.joinButton.disabled = false;
    this.nameInput.setAttribute("aria-invalid", error ? "true" : "false");
    this.nameInput.focus();
  }

  showChat(name, room) {
    this.loginView.hidden = true;
    this.chatView.hidden = false;
    this.whoami.hidden = false;
    this.meName.textContent = name;
    this.meRoom.textContent = room ? ` in ${room}` : "";
    this.messageInput.focus();
  }

  /** state: "idle" | "connecting" | "joining" | "online" | "waiting" */
  setStatus(state, text) {
    this.status.dataset.state = state;
    this.statusText.textContent = text;
    this.retryButton.hidden = state !== "waiting";
  }

  setComposerStatus(text, isError = false) {
    this.composerStatus.textContent = text;
    this.composerStatus.classList.toggle("is-error", isError);
  }

  clearMessages() {
    this.messages.replaceChildren();
  }

  /** Append one entry; `kind` is say | login | logout | error | system. */
  addMessage(kind, { time = "", from = "", to = "", text = "", tag = "", mine = false } = {}) {
    const list = this.messages;
    const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 48;
    const li = el("li", { cls: `msg msg-${kind}`, attrs: { "data-kind": kind } });
    if (mine) li.classList.add("msg-mine");
    if (tag === "private") li.classList.add("msg-private");
    const head = el("div", { cls: "msg-head" }, [
      timeNode(time),
      tag ? el("span", { cls: `msg-tag tag-${tag}`, text: tag }) : null,
      from ? el("span", { cls: "msg-from", text: from }) : null,
      to ? el("span", { cls: "msg-to", text: to }) : null,
    ]);
    li.append(head, el("p", { cls: "msg-text", text }));
    list.append(li);
    while (list.childElementCount > MAX_MESSAGES) list.firstElementChild.remove();
    if (nearBottom || mine) list.scrollTop = list.scrollHeight;
    return li;
  }

  /** Redraw the online list. users: [{uid, name}], selfUid may be null. */
  renderUsers(users, selfUid, stale = false) {
    this.userCount.textContent = String(users.length);
    this.users.classList.toggle("is-stale", stale);
    this.users.replaceChildren(
      ...users.map(({ uid, name }) => {
        const li = el("li", { cls: "user", attrs: { "data-uid": String(uid) } });
        if (uid === selfUid) {
          li.classList.add("user-self");
          li.append(el("span", { cls: "user-name", text: name }), el("span", { cls: "user-you", text: "(you)" }));
        } else {
          li.append(
            el("button", {
              cls: "user-name",
              text: name,
              attrs: { type: "button", "data-uid": String(uid), title: `Send a private message to ${name}` },
            }),
          );
        }
        return li;
      }),
    );
  }

  /**
   * Redraw the recipient <select>: "Everyone" plus every other user. `selected` is "all", a uid,
   * or {gone: name} to show a disabled "(left)" entry that blocks sending until a new choice.
   */
  renderRecipients(users, selfUid, selected) {
    const counts = new Map();
    for (const u of users) counts.set(u.name, (counts.get(u.name) || 0) + 1);
    const options = [el("option", { text: "Everyone", attrs: { value: "all" } })];
    for (const { uid, name } of users) {
      if (uid === selfUid) continue;
      const label = counts.get(name) > 1 ? `${name} (#${uid})` : name;
      options.push(el("option", { text: label, attrs: { value: String(uid) } }));
    }
    if (selected && typeof selected === "object") {
      const gone = el("option", { text: `${selected.gone} (left)`, attrs: { value: "" } });
      gone.disabled = true;
      options.push(gone);
    }
    this.recipient.replaceChildren(...options);
    if (selected && typeof selected === "object") this.recipient.value = "";
    else this.recipient.value = String(selected ?? "all");
    if (this.recipient.selectedIndex < 0) this.recipient.value = "all";
    this.composer.classList.toggle("is-private", this.recipient.value !== "all");
  }
}
