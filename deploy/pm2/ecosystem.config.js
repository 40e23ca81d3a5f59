// PM2 processes for a miner and a validator.
//   cp deploy/miner.env.example /etc/neuron/miner.env && cp deploy/validator.env.example /etc/neuron/validator.env
//   chmod 600 /etc/neuron/*.env          # then edit them (readable by the user PM2 runs as; NEURON_ETC moves them)
//   pm2 start deploy/pm2/ecosystem.config.js --only neuron-miner     # one of the two
//   pm2 start deploy/pm2/ecosystem.config.js && pm2 save
//   pm2 logs neuron-miner                 (and ~/.neuron/logs/*.log, rotated by neuron itself)
// Flags and secrets come from the environment files, read by the shell that PM2 starts.
const fs = require("fs");

function envFile(path) {
  // KEY=VALUE lines (quotes stripped, # comments skipped), as systemd's EnvironmentFile reads them.
  // A missing file is not fatal: the other process still starts, and this one runs on flags and defaults.
  const env = {};
  if (!fs.existsSync(path)) {
    console.warn(`neuron: ${path} not found; starting without it (copy it from deploy/*.env.example)`);
    return env;
  }
  for (const line of fs.readFileSync(path, "utf8").split("\n")) {
    const m = line.match(/^\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$/);
    if (m) env[m[1]] = m[2].replace(/^"(.*)"$/, "$1");
  }
  return env;
}

const venv = process.env.NEURON_VENV || "/opt/neuron/.venv";
const etc = process.env.NEURON_ETC || "/etc/neuron";
const logs = process.env.NEURON_LOG_DIR || `${process.env.HOME}/.neuron/logs`;

module.exports = {
  apps: [
    {
      name: "neuron-miner",
      script: "/bin/sh",
      args: ["-c", `exec ${venv}/bin/neuron miner $NEURON_MINER_ARGS --logging.logging_dir ${logs}`],
      env: envFile(`${etc}/miner.env`),
      kill_timeout: 30000, // SIGTERM, then in-flight calls finish within --axon.grace_s
      restart_delay: 10000,
      autorestart: true,
      // A config error fails in seconds, before the model loads: ten quick deaths in a row stop the restarts.
      min_uptime: 60000,
      max_restarts: 10,
    },
    {
      name: "neuron-validator",
      script: "/bin/sh",
      args: ["-c", `exec ${venv}/bin/neuron validator $NEURON_VALIDATOR_ARGS --logging.logging_dir ${logs}`],
      env: envFile(`${etc}/validator.env`),
      kill_timeout: 30000, // SIGTERM, then the state is saved
      restart_delay: 10000,
      autorestart: true,
      // A config error fails in seconds, before the model loads: ten quick deaths in a row stop the restarts.
      min_uptime: 60000,
      max_restarts: 10,
    },
  ],
};
