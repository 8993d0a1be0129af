// A session flow with the JavaScript SDK (@azure/service-bus) against the trio-sessions
// emulator: send, accept a session by id and the next available one, receive, complete,
// abandon (and receive again), dead-letter, session state, lock renewal, close.
//
//   node session_flow.mjs "<connection string>" <session queue>
//
// Prints one JSON object per step on stdout, for tests/emulator/test_js_sdk.py to check;
// any failure ends the script with a non-zero exit code and the error on stderr.

import { ServiceBusClient } from "@azure/service-bus";

const [connectionString, queue] = process.argv.slice(2);
if (!connectionString || !queue) {
  console.error("usage: node session_flow.mjs <connection string> <session queue>");
  process.exit(2);
}

const report = (step, fields = {}) => console.log(JSON.stringify({ step, ...fields }));
const summary = (messages) => ({
  bodies: messages.map((m) => m.body),
  deliveryCounts: messages.map((m) => m.deliveryCount),
  sequenceNumbers: messages.map((m) => Number(m.sequenceNumber)),
  lockTokens: messages.map((m) => m.lockToken),
});
const errorOf = async (promise) => {
  try {
    await promise;
    return null;
  } catch (error) {
    return { name: error.name, code: error.code };
  }
};

// No retries, so a failure shows at once; the time-out bounds every operation and the
// server-side wait for a next-available session.
const client = new ServiceBusClient(connectionString, {
  retryOptions: { maxRetries: 0, timeoutInMs: 5000 },
});
try {
  const sender = client.createSender(queue);
  await sender.sendMessages([
    { body: "a1", sessionId: "a", messageId: "m-a1", applicationProperties: { n: 1 } },
    { body: "a2", sessionId: "a", messageId: "m-a2" },
    { body: "a3", sessionId: "a", messageId: "m-a3" },
  ]);
  await sender.sendMessages({ body: "b1", sessionId: "b", messageId: "m-b1" });
  await sender.close();
  report("sent");

  const a = await client.acceptSession(queue, "a", { maxAutoLockRenewalDurationInMs: 0 });
  report("accepted", { sessionId: a.sessionId, lockedUntil: a.sessionLockedUntilUtc.getTime() });
  report("locked-elsewhere", { error: await errorOf(client.acceptSession(queue, "a")) });

  const first = await a.receiveMessages(3, { maxWaitTimeInMs: 5000 });
  report("received", {
    ...summary(first),
    messageIds: first.map((m) => m.messageId),
    applicationProperties: first[0].applicationProperties,
  });
  await a.completeMessage(first[0]);
  await a.abandonMessage(first[1]);
  await a.deadLetterMessage(first[2], {
    deadLetterReason: "bad",
    deadLetterErrorDescription: "very bad",
  });
  report("settled");

  // Asks for more than there is: the SDK drains the link when its wait ends.
  const again = await a.receiveMessages(5, { maxWaitTimeInMs: 1000 });
  report("received-again", summary(again));
  await a.completeMessage(again[0]);
  const none = await a.receiveMessages(1, { maxWaitTimeInMs: 300 });
  report("received-none", { count: none.length });

  await a.setSessionState("checkpoint-1");
  const state = await a.getSessionState();
  report("state", { state: Buffer.from(state).toString() });
  const renewed = await a.renewSessionLock();
  report("renewed", { lockedUntil: renewed.getTime() });
  await a.close();
  report("closed", { sessionId: "a" });

  const b = await client.acceptNextSession(queue, { maxAutoLockRenewalDurationInMs: 0 });
  const fromB = await b.receiveMessages(1, { maxWaitTimeInMs: 5000 });
  await b.completeMessage(fromB[0]);
  report("next-available", { sessionId: b.sessionId, ...summary(fromB) });
  await b.close();
  report("closed", { sessionId: "b" });

  // Nothing left: the emulator waits as long as the client's time-out says, then refuses.
  const impatient = new ServiceBusClient(connectionString, {
    retryOptions: { maxRetries: 0, timeoutInMs: 1000 },
  });
  const waited = Date.now();
  const noSession = await errorOf(
    impatient.acceptNextSession(queue, { maxAutoLockRenewalDurationInMs: 0 }),
  );
  report("no-session", { error: noSession, waitedMs: Date.now() - waited });
  await impatient.close();
} finally {
  await client.close();
}
report("done");
