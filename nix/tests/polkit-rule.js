// Runs lib.polkitRule (the text given as argv[2]) against a stand-in for polkit's rule API,
// as polkitd would for each request, and checks the answer. Run by scripts/nix-check.sh:
//   node nix/tests/polkit-rule.js RULE_FILE
// Prints one line per request; exits 1 if any answer is wrong.
"use strict";
const fs = require("fs");

const text = fs.readFileSync(process.argv[2], "utf8");
const rules = [];
const polkit = {
  Result: { YES: "yes", NO: "no", AUTH_ADMIN: "auth_admin", NOT_HANDLED: "not_handled" },
  addRule: (f) => rules.push(f),
  log: () => {},
};
new Function("polkit", text)(polkit);

// What polkitd does: the first rule with an answer other than NOT_HANDLED decides.
function decide(id, user, details) {
  const action = { id, lookup: (k) => details[k] };
  const subject = { user };
  for (const r of rules) {
    const res = r(action, subject);
    if (res !== undefined && res !== null && res !== polkit.Result.NOT_HANDLED) return res;
  }
  return "not_handled";
}

const manage = "org.freedesktop.systemd1.manage-units";
const vm = "blixard-vm-default\\x40web.service";
const cases = [
  // what the systemd supervisor does: systemd-run (StartTransientUnit), stop, reset-failed, set-property
  [manage, "blixard", { unit: vm, verb: "start" }, "yes"],
  [manage, "blixard", { unit: vm, verb: "stop" }, "yes"],
  [manage, "blixard", { unit: vm, verb: "reset-failed" }, "yes"],
  [manage, "blixard", { unit: vm, verb: "set-property" }, "yes"],
  // verbs it does not use
  [manage, "blixard", { unit: vm, verb: "restart" }, "not_handled"],
  [manage, "blixard", { unit: vm, verb: "kill" }, "not_handled"],
  // other units
  [manage, "blixard", { unit: "sshd.service", verb: "stop" }, "not_handled"],
  [manage, "blixard", { unit: "blixard.service", verb: "start" }, "not_handled"],
  [manage, "blixard", { unit: "blixard-thinpool.service", verb: "stop" }, "not_handled"],
  [manage, "blixard", { unit: "x-blixard-vm-web.service", verb: "start" }, "not_handled"],
  // systemd < 257: StartTransientUnit names no unit
  [manage, "blixard", {}, "not_handled"],
  // other users, other actions
  [manage, "alice", { unit: vm, verb: "start" }, "not_handled"],
  [manage, "root", { unit: vm, verb: "stop" }, "not_handled"],
  ["org.freedesktop.systemd1.manage-unit-files", "blixard", { unit: vm, verb: "start" }, "not_handled"],
  ["org.freedesktop.systemd1.reload-daemon", "blixard", {}, "not_handled"],
];

let failed = 0;
if (rules.length !== 1) {
  console.log(`FAIL the rule text adds ${rules.length} rules, want 1`);
  failed++;
}
for (const [id, user, details, want] of cases) {
  const got = decide(id, user, details);
  const what = `${id} by ${user} ${JSON.stringify(details)}`;
  if (got === want) {
    console.log(`ok   ${what}: ${got}`);
  } else {
    console.log(`FAIL ${what}: ${got}, want ${want}`);
    failed++;
  }
}
process.exit(failed === 0 ? 0 : 1);
