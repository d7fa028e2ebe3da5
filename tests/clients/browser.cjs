// Pages in a real browser: Debian's Chromium, headless, driven by playwright-core.
//
// Usage: node browser.cjs URL... (NODE_PATH names where playwright-core is;
// CHROMIUM overrides /usr/bin/chromium)
// Opens each URL in a page of its own and prints the page's `window.report`, as
// {"page": i, ...report}, each time it changes, until every page's report is done.
const { chromium } = require('playwright-core');

const urls = process.argv.slice(2);

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    // The flags that work on this kind of machine (no sandbox as root, no network
    // beyond loopback).
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const pages = await Promise.all(urls.map(async (url, index) => {
    const page = await browser.newPage();
    page.on('console', (message) => console.error(`page ${index}: ${message.text()}`));
    await page.goto(url);
    return page;
  }));
  const last = pages.map(() => '');
  const done = pages.map(() => false);
  while (!done.every(Boolean)) {
    for (const [index, page] of pages.entries()) {
      if (done[index]) continue;
      const report = await page.evaluate(() => JSON.stringify(window.report || {}));
      if (report !== last[index]) {
        last[index] = report;
        const parsed = JSON.parse(report);
        console.log(JSON.stringify({ page: index, ...parsed }));
        done[index] = Boolean(parsed.done);
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  await browser.close();
})().catch((error) => {
  console.log(JSON.stringify({ error: String(error) }));
  process.exit(1);
});
