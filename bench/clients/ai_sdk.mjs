// Vercel AI SDK 6 against this server: openai.responses, openai.chat, openai-compatible and anthropic providers; a zod
// tool (toolChoice required, two steps), streamText, generateObject. `node ai_sdk.mjs BASE_URL` next to node_modules
// with ai@6, @ai-sdk/openai@3, @ai-sdk/anthropic@3, @ai-sdk/openai-compatible@2, zod (bench/agent_clients.py installs them).
import { generateText, streamText, generateObject, tool, stepCountIs } from "ai";
import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { createAnthropic } from "@ai-sdk/anthropic";
import { z } from "zod";

const base = process.argv[2];
const openai = createOpenAI({ baseURL: base + "/v1", apiKey: "unused" });
const compatible = createOpenAICompatible({ name: "local", baseURL: base + "/v1", apiKey: "unused", supportsStructuredOutputs: true });
const anthropic = createAnthropic({ baseURL: base + "/v1", apiKey: "unused" });
const weather = tool({ description: "The weather in a city", inputSchema: z.object({ city: z.string() }),
  execute: async ({ city }) => `It is sunny in ${city}.` });
const models = { "openai.responses": openai.responses("smollm2"), "openai.chat": openai.chat("smollm2"),
  "openai-compatible": compatible("smollm2"), "anthropic": anthropic("smollm2") };
for (const [label, model] of Object.entries(models)) {
  const text = await generateText({ model, prompt: "What is the weather in Paris?", tools: { weather }, toolChoice: "required", stopWhen: stepCountIs(2), maxOutputTokens: 48, maxRetries: 0 });
  console.log(label, "generateText ->", JSON.stringify(text.text).slice(0, 60), text.finishReason);
  const stream = streamText({ model, prompt: "Say hello.", maxOutputTokens: 24, maxRetries: 0 });
  let streamed = ""; for await (const part of stream.textStream) streamed += part;
  console.log(label, "streamText ->", JSON.stringify(streamed).slice(0, 60));
  const object = await generateObject({ model, schema: z.object({ colour: z.string() }), prompt: "Name a colour.", maxOutputTokens: 48, maxRetries: 0 });
  console.log(label, "generateObject ->", JSON.stringify(object.object));
}
