// Runs a GGUF model in llama.cpp through node-llama-cpp's prebuilt CPU binary; jprune.llm.llamacpp drives it.
// stdin: one JSON request; stdout: one JSON line. Token ids go in and come out as they are (no BOS, no
// re-tokenization), so jprune and llama.cpp are compared on the same ids.
//   {"model", "threads", "context", "batch",
//    "windows": [[ids]]               -> "nll": [Σ -log p(next)], "count": [n]     (perplexity)
//    "prompts": [[ids]], "new_tokens" -> "greedy": [[ids]]                         (argmax decoding)
//    "bench": {"prompt": [ids], "gen": n, "repeats": r} -> "bench": {"pp_tokens_per_s": [..], "tg_tokens_per_s": [..]}}
import {pathToFileURL} from "node:url";
import path from "node:path";

function fail(message) {
  process.stdout.write(JSON.stringify({error: message}) + "\n");
  process.exit(3);
}

const chunks = [];
for await (const c of process.stdin) chunks.push(c);
const req = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const dir = process.env.JPRUNE_LLAMACPP_DIR;
let lib;
try {
  lib = await import(pathToFileURL(path.join(dir, "node_modules", "node-llama-cpp", "dist", "index.js")).href);
} catch (e) {
  fail(`cannot load node-llama-cpp from ${dir}: ${e.message}`);
}
const t0 = performance.now();
let llama, model;
try {
  llama = await lib.getLlama({gpu: false, build: "never", logLevel: "error", maxThreads: req.threads});
  model = await llama.loadModel({modelPath: req.model});
} catch (e) {
  fail(`llama.cpp cannot load ${req.model}: ${e.message}`);
}
const out = {load_s: (performance.now() - t0) / 1000, n_params: Number(model.fileInsights?.modelParameters ?? 0)};
const ctx = await model.createContext({contextSize: req.context ?? 1024, batchSize: req.batch ?? 512,
                                       threads: req.threads, sequences: 1});
const seq = ctx.getSequence();

if (req.windows) {
  out.nll = [];
  out.count = [];
  for (const w of req.windows) {
    await seq.clearHistory();
    const items = w.map((t, i) => i + 1 < w.length
      ? [t, {generateNext: {logits: {filter: {tokens: [w[i + 1]], includeTop: 1}}, totalLogitWeight: true,
                            options: {temperature: 1, topK: 0, topP: 1, minP: 0}}}]
      : t);
    const res = await seq.controlledEvaluate(items);
    let nll = 0;
    for (let i = 0; i + 1 < w.length; i++) {
      const n = res[i].next;
      let mx = -Infinity;
      for (const v of n.logits.values()) mx = Math.max(mx, v);
      nll -= n.logits.get(w[i + 1]) - mx - Math.log(n.totalLogitWeight);
    }
    out.nll.push(nll);
    out.count.push(w.length - 1);
  }
}

if (req.prompts) {
  out.greedy = [];
  for (const p of req.prompts) {
    await seq.clearHistory();
    const got = [];
    if ((req.new_tokens ?? 8) > 0) {
      for await (const tok of seq.evaluate(p, {temperature: 0})) {
        got.push(tok);
        if (got.length >= (req.new_tokens ?? 8)) break;
      }
    }
    out.greedy.push(got);
  }
}

if (req.bench) {
  const b = req.bench;
  const pp = [], tg = [];
  for (let r = 0; r < (b.repeats ?? 3); r++) {
    await seq.clearHistory();
    let s = performance.now();
    await seq.evaluateWithoutGeneratingNewTokens(b.prompt);
    pp.push(b.prompt.length / ((performance.now() - s) / 1000));
    await seq.clearHistory();
    let n = 0, first = 0;
    for await (const tok of seq.evaluate(b.prompt.slice(0, 16), {temperature: 0})) {
      if (n === 0) first = performance.now();
      n += 1;
      if (n > (b.gen ?? 32)) break;
    }
    tg.push((n - 1) / ((performance.now() - first) / 1000));
  }
  out.bench = {pp_tokens_per_s: pp, tg_tokens_per_s: tg, prompt_tokens: b.prompt.length, gen_tokens: b.gen ?? 32};
}

await ctx.dispose();
await model.dispose();
process.stdout.write(JSON.stringify(out) + "\n");
process.exit(0);
