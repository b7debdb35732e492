// The same chat completion request written three ways, for this server's base URL: cURL, Python
// (the official `openai` package) and JavaScript (the official `openai` npm package). The model
// pages show the examples; the playground's "view code" shows its current settings.

// Fields the Python client takes as keyword arguments; the others go in `extra_body`.
const PYTHON_KEYWORDS = new Set([
  "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
  "stream", "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty",
  "logit_bias", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
  "parallel_tool_calls", "user",
]);

const KEY_ENV = "TOKENMILL_API_KEY";
const NO_KEY = "not-needed"; // the clients want some key; a server without keys ignores it

const indent = (text, pad) => text.split("\n").join(`\n${pad}`);

// A JSON value as a Python literal (JSON strings and numbers are Python literals already).
function python(value, pad = "") {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    const inner = pad + "    ";
    return `[\n${value.map((v) => inner + python(v, inner)).join(",\n")},\n${pad}]`;
  }
  if (typeof value === "object") {
    const entries = Object.entries(value);
    if (!entries.length) return "{}";
    const inner = pad + "    ";
    const items = entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${python(v, inner)}`);
    return `{\n${items.join(",\n")},\n${pad}}`;
  }
  return JSON.stringify(value);
}

// A JSON value as a JavaScript literal, keys unquoted where they are identifiers.
function javascript(value) {
  return JSON.stringify(value, null, 2).replace(/^(\s*)"([A-Za-z_$][\w$]*)":/gm, "$1$2:");
}

function curl(base, body, auth) {
  const json = JSON.stringify(body, null, 2).replaceAll("'", "'\\''");
  const lines = [];
  if (auth) lines.push(`# Your API key in ${KEY_ENV} first: export ${KEY_ENV}=sk-tm-...`);
  lines.push(`curl${body.stream ? " -N" : ""} "${base}/chat/completions" \\`,
    '  -H "Content-Type: application/json" \\');
  if (auth) lines.push(`  -H "Authorization: Bearer \${${KEY_ENV}}" \\`);
  lines.push(`  -d '${json}'`);
  return lines.join("\n");
}

function pythonCode(base, body, auth) {
  const args = [];
  const extra = {};
  for (const [name, value] of Object.entries(body)) {
    if (PYTHON_KEYWORDS.has(name)) args.push(`    ${name}=${python(value, "    ")},`);
    else extra[name] = value;
  }
  if (Object.keys(extra).length) args.push(`    extra_body=${python(extra, "    ")},`);
  const key = auth ? `os.environ["${KEY_ENV}"]` : JSON.stringify(NO_KEY);
  const lines = [
    ...(auth ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(base)}, api_key=${key})`,
    "",
    "completion = client.chat.completions.create(",
    ...args,
    ")",
  ];
  if (body.stream) {
    lines.push("for chunk in completion:", "    if chunk.choices:",
      '        print(chunk.choices[0].delta.content or "", end="", flush=True)', "print()");
  } else {
    lines.push("print(completion.choices[0].message.content)");
  }
  return lines.join("\n");
}

function javascriptCode(base, body, auth) {
  const key = auth ? `process.env.${KEY_ENV}` : JSON.stringify(NO_KEY);
  const lines = [
    "// example.mjs: run with `node example.mjs`",
    'import OpenAI from "openai";',
    "",
    `const client = new OpenAI({ baseURL: ${JSON.stringify(base)}, apiKey: ${key} });`,
    "",
    `const completion = await client.chat.completions.create(${indent(javascript(body), "")});`,
  ];
  if (body.stream) {
    lines.push("for await (const chunk of completion) {",
      '  process.stdout.write(chunk.choices[0]?.delta?.content ?? "");', "}",
      'process.stdout.write("\\n");');
  } else {
    lines.push("console.log(completion.choices[0].message.content);");
  }
  return lines.join("\n");
}

// {curl, python, javascript}: `body` is the request body of POST /v1/chat/completions.
export function snippets(base, body, auth) {
  return {
    curl: curl(base, body, auth),
    python: pythonCode(base, body, auth),
    javascript: javascriptCode(base, body, auth),
  };
}

// The model pages' three examples: a chat completion, the same streamed, and JSON mode.
export function exampleBodies(model) {
  const messages = [
    { role: "system", content: "Act like you are a helpful assistant." },
    { role: "user", content: "Hi there!" },
  ];
  return {
    plain: { model, messages, max_tokens: 512 },
    stream: { model, messages, max_tokens: 512, stream: true },
    json: {
      model,
      messages: [
        { role: "system", content: "Reply with a JSON object." },
        { role: "user", content: "Name three primary colours, as {\"colours\": [...]}." },
      ],
      max_tokens: 512,
      temperature: 0, // the likeliest tokens: a structured answer, the same every time
      response_format: { type: "json_object" },
    },
  };
}
