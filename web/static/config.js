// Fallback for when the files are served by another web server: `python -m web` answers
// /config.js itself with the values of --ws-url and --metrics-url. null means
// ws://<page host>:7272 and http://<page host>:1237/metrics (the admin page's).
export default { wsUrl: null, metricsUrl: null };
