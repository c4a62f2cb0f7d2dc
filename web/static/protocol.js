// The chat wire protocol (see the project README): JSON text frames.
//
// client -> server: {"type":"login","name":N[,"room":R][,"resume":...]}
//                   {"type":"say","to_uid":"all"|UID,"content":C}
// server -> client: user_list, login, say, logout, error (parsed by parseMessage below).
//
// The page opts in to continuity (the README's "Continuity"): its first login says
// "resume": true; after a reconnect it sends {"token", "epoch", "offset"}, the member token
// and the last room position it saw, and carries on as the same member with what it missed.

export const MAX_NAME = 32;
export const MAX_CONTENT = 4096;

/** Length in Unicode code points, as the server counts characters. */
export function charCount(text) {
  return [...text].length;
}

/**
 * Build a login request; the room is only sent when one was given. `resume` is true (opt in),
 * or what the page last had: {token, epoch, offset} (any of them may be missing).
 */
export function loginMessage(name, room, resume = true) {
  const msg = { type: "login", name };
  if (room) msg.room = room;
  if (resume) msg.resume = resume;
  return msg;
}

/** The login's "resume" from the member token and the last position seen (either may be null). */
export function resumeField(token, position) {
  if (!token && !position) return true;
  const resume = {};
  if (token) resume.token = token;
  if (position) Object.assign(resume, position);
  return resume;
}

/** Build a say request; `to` is "all" or a recipient uid (a number). */
export function sayMessage(to, content) {
  return { type: "say", to_uid: to === "all" ? "all" : Number(to), content };
}

const isUid = (v) => Number.isSafeInteger(v) && v >= 0;
const isStr = (v) => typeof v === "string";
const optStr = (v) => (isStr(v) ? v : "");

/** A room message's position {epoch, offset}, or null when it has none. */
function position(m) {
  return isStr(m.epoch) && Number.isSafeInteger(m.offset) ? { epoch: m.epoch, offset: m.offset } : null;
}

/**
 * Parse one server frame. Returns a normalised message object, or null when the frame is not
 * valid JSON or not a message this page knows; unknown fields are dropped, never rendered.
 */
export function parseMessage(text) {
  let m;
  try {
    m = JSON.parse(text);
  } catch {
    return null;
  }
  if (m === null || typeof m !== "object") return null;
  switch (m.type) {
    case "user_list": {
      if (!Array.isArray(m.user_list)) return null;
      const users = m.user_list
        .filter((u) => u && isUid(u.uid) && isStr(u.name))
        .map((u) => ({ uid: u.uid, name: u.name }));
      const list = { type: "user_list", users, position: position(m) };
      if (isUid(m.uid)) list.uid = m.uid;
      if (isStr(m.token)) list.token = m.token;
      if (typeof m.resumed === "boolean") list.resumed = m.resumed;
      if (typeof m.recovered === "boolean") list.recovered = m.recovered;
      if (Number.isSafeInteger(m.missed)) list.missed = m.missed;
      return list;
    }
    case "login":
    case "logout":
    case "back":
      if (!isUid(m.uid) || !isStr(m.name)) return null;
      return { type: m.type, uid: m.uid, name: m.name, time: optStr(m.time), position: position(m) };
    case "say":
      if (!isUid(m.from_uid) || !isStr(m.content)) return null;
      if (m.to_uid !== "all" && !isUid(m.to_uid)) return null;
      return {
        type: "say",
        from: m.from_uid,
        to: m.to_uid,
        content: m.content,
        time: optStr(m.time),
        position: position(m),
      };
    case "error":
      return { type: "error", code: optStr(m.code), message: optStr(m.message) };
    default:
      return null;
  }
}
