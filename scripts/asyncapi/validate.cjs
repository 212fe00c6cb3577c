// Validates an AsyncAPI document with the official parser (@asyncapi/parser): prints every diagnostic as
// `severity code path: message` and exits 1 when there is an error or a warning.
// Usage: NODE_PATH=.cache/asyncapi-node/node_modules node scripts/asyncapi/validate.cjs FILE
const fs = require('fs');
const { Parser } = require('@asyncapi/parser');

const SEVERITY = ['error', 'warning', 'info', 'hint'];

(async () => {
  const { document, diagnostics } = await new Parser().parse(fs.readFileSync(process.argv[2], 'utf8'));
  for (const d of diagnostics) {
    console.log(`${SEVERITY[d.severity]} ${d.code} ${d.path.join('.')}: ${d.message}`);
  }
  const failed = !document || diagnostics.some((d) => d.severity <= 1);
  console.log(failed ? 'INVALID' : `valid AsyncAPI ${document.version()}`);
  process.exit(failed ? 1 : 0);
})().catch((error) => {
  console.log(`parser failed: ${error.stack || error}`);
  process.exit(2);
});
