// A small parser of the Prometheus text exposition format (version 0.0.4), enough for the
// admin page: every sample as {name, labels, value}. Comments (# HELP, # TYPE) are skipped;
// label values may hold escaped backslashes, quotes and line breaks; timestamps are ignored.
// Why our own: the page has no build step and loads nothing from elsewhere (no CDN), and the
// format is a line per sample.

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*/;

/** Parse one exposition into an array of samples. A malformed line is skipped. */
export function parseExposition(text) {
  const samples = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const sample = parseLine(line);
    if (sample) samples.push(sample);
  }
  return samples;
}

function parseLine(line) {
  const match = NAME.exec(line);
  if (!match) return null;
  const name = match[0];
  let i = name.length;
  const labels = {};
  if (line[i] === "{") {
    i += 1;
    while (i < line.length && line[i] !== "}") {
      const key = /^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"/.exec(line.slice(i));
      if (!key) return null;
      i += key[0].length;
      let value = "";
      while (i < line.length && line[i] !== '"') {
        if (line[i] === "\\" && i + 1 < line.length) {
          const next = line[i + 1];
          value += next === "n" ? "\n" : next;
          i += 2;
        } else {
          value += line[i];
          i += 1;
        }
      }
      if (line[i] !== '"') return null;
      labels[key[1]] = value;
      i += 1;
      while (line[i] === "," || line[i] === " ") i += 1;
    }
    if (line[i] !== "}") return null;
    i += 1;
  }
  const fields = line.slice(i).trim().split(/\s+/);
  if (!fields[0]) return null;
  const value = parseValue(fields[0]);
  return Number.isNaN(value) && fields[0] !== "NaN" ? null : { name, labels, value };
}

function parseValue(text) {
  if (text === "+Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text);
}
