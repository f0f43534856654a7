import { type DestinationStream, type Logger, pino } from "pino";

export type { Logger };

import { logLevels } from "./config.js";

/**
 * The service's structured log: one JSON object per line on stdout (pino),
 * at LOG_LEVEL (default info). A failed call is one line at info (the
 * caller's mistake), warn (the service could not serve it now) or error
 * (INTERNAL, with its cause on the line before); with LOG_LEVEL=debug every
 * call gets an access line. Lines name the method, status, reason,
 * duration, request id and trace id: never a secret, a key, or a value the
 * caller sent.
 */
export function createLogger(level = "info", destination?: DestinationStream): Logger {
  if (!logLevels.includes(level)) {
    throw new Error(`LOG_LEVEL must be one of ${logLevels.join(", ")}, not ${JSON.stringify(level)}`);
  }
  return pino(
    {
      level,
      base: { service: "keys-driver-service", pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    destination,
  );
}
