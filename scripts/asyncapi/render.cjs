// Renders an AsyncAPI document as one self-contained HTML page with the official React component
// (@asyncapi/react-component, the renderer @asyncapi/html-template is built on): its standalone bundle and
// style sheet are inlined, so the page needs no network.
// Usage: NODE_PATH=.cache/asyncapi-node/node_modules node scripts/asyncapi/render.cjs IN.yaml OUT.html
const fs = require('fs');
const path = require('path');

const component = path.dirname(require.resolve('@asyncapi/react-component/package.json'));
const [input, output] = process.argv.slice(2);
const text = fs.readFileSync(input, 'utf8');
const bundle = fs.readFileSync(path.join(component, 'browser/standalone/index.js'), 'utf8');
const styles = fs.readFileSync(path.join(component, 'styles/default.min.css'), 'utf8');
// Inside <script>, "</script" and "<!--" would end or confuse the element: JSON may escape every "<".
const inline = (value) => JSON.stringify(value).replace(/</g, '\\u003c');
const config = { show: { sidebar: true }, sidebar: { showOperations: 'byDefault' } };

const html = `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Intygstjänsten — AsyncAPI</title>
<style>${styles}</style>
</head>
<body>
<div id="asyncapi"></div>
<script>${bundle.replace(/<\/script/gi, '<\\/script')}</script>
<script>
AsyncApiStandalone.render({ schema: ${inline(text)}, config: ${inline(config)} }, document.getElementById('asyncapi'));
</script>
</body>
</html>
`;
fs.writeFileSync(output, html);
console.log(`wrote ${output} (${Math.round(html.length / 1024)} KiB)`);
