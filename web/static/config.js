// Fallback for when the files are served by another web server: `python -m web` answers
// /config.js itself with the value of --ws-url. null means ws://<page host>:7272.
export default { wsUrl: null };
