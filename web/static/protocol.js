// The chat wire protocol (see the project README): JSON text frames.
//
// client -> server: {"type":"login","name":N[,"room":R]}
//                   {"type":"say","to_uid":"all"|UID,"content":C}
// server -> client: user_list, login, say, logout, error (parsed by parseMessage below).

export const MAX_NAME = 32;
export const MAX_CONTENT = 4096;

/** Length in Unicode code points, as the server counts characters. */
export function charCount(text) {
  return [...text].length;
}

/** Build a login request; the room is only sent when one was given. */
export function loginMessage(name, room) {
  const msg = { type: "login", name };
  if (room) msg.room = room;
  return msg;
}

/** Build a say request; `to` is "all" or a recipient uid (a number). */
export function sayMessage(to, content) {
  return { type: "say", to_uid: to === "all" ? "all" : Number(to), content };
}

const isUid = (v) => Number.isSafeInteger(v) && v >= 0;
const isStr = (v) => typeof v === "string";
const optStr = (v) => (isStr(v) ? v : "");

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
      return { type: "user_list", users };
    }
    case "login":
    case "logout":
      if (!isUid(m.uid) || !isStr(m.name)) return null;
      return { type: m.type, uid: m.uid, name: m.name, time: optStr(m.time) };
    case "say":
      if (!isUid(m.from_uid) || !isStr(m.content)) return null;
      if (m.to_uid !== "all" && !isUid(m.to_uid)) return null;
      return {
        type: "say",
        from: m.from_uid,
        to: m.to_uid,
        content: m.content,
        time: optStr(m.time),
      };
    case "error":
      return { type: "error", code: optStr(m.code), message: optStr(m.message) };
    default:
      return null;
  }
}
