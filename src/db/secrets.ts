import type { Sql } from "./client.js";

/**
 * A secret the service generated for itself at migration time and shares
 * between replicas, e.g. "page_token". Undefined if it is missing.
 */
export async function findServiceSecret(sql: Sql, name: string): Promise<Uint8Array | undefined> {
  const [row]: [{ value: Uint8Array }?] = await sql`
    select value
    from service_secrets
    where name = ${name}
  `;
  return row?.value;
}
