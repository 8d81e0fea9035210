// The shop's assistant page: streams answers from the llm-blueprint API mounted in this app.
// Model output is untrusted: it is only ever inserted as text (textContent), never as HTML.
(function () {
  "use strict";
  const root = document.getElementById("chat");
  const api = root.dataset.api;
  const csrf = root.dataset.csrf;
  const $ = (id) => document.getElementById(id);
  const conversation = [];  // [{role, content}], kept in the page
  let controller = null;

  function headers() {
    return { "Content-Type": "application/json", "X-CSRF-Token": csrf };
  }

  function addTurn(role, text) {
    const item = document.createElement("li");
    item.className = role;
    const label = document.createElement("span");
    label.className = "role";
    label.textContent = role === "user" ? "You" : role === "assistant" ? "Assistant" : "Error";
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    item.append(label, body);
    $("transcript").append(item);
    return body;
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      return (body.error && body.error.message) || response.statusText;
    } catch (e) {
      return response.status + " " + response.statusText;
    }
  }

  async function loadModels() {
    const response = await fetch(api + "/models", { headers: headers() });
    if (!response.ok) {
      $("status").textContent = "Cannot list models: " + (await errorMessage(response));
      return;
    }
    const body = await response.json();
    // Chat models only (embedding and rerank models are listed too); one not loaded yet loads on its first question.
    for (const model of body.data.filter((m) => !m.kind || m.kind === "chat")) {
      const option = document.createElement("option");
      option.value = model.id;
      option.textContent = model.status === "loaded" || !model.status ? model.id : model.id + " (" + model.status + ")";
      $("model").append(option);
    }
  }

  // Server-Sent Events from a fetch body: "data: {...}\n\n" frames, ": comments" skipped.
  async function* sseData(response, signal) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    while (!signal.aborted) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) !== -1) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of frame.split("\n")) {
          if (line.startsWith("data: ")) yield line.slice(6);
        }
      }
    }
  }

  async function send(text) {
    conversation.push({ role: "user", content: text });
    addTurn("user", text);
    const answer = addTurn("assistant", "");
    answer.dataset.updates = "0";
    answer.parentElement.dataset.state = "streaming";
    controller = new AbortController();
    setBusy(true);
    $("status").textContent = "Thinking…";
    let finish = null;
    try {
      const response = await fetch(api + "/chat/completions", {
        method: "POST", headers: headers(), signal: controller.signal,
        body: JSON.stringify({
          model: $("model").value, messages: conversation, stream: true,
          temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
        }),
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      for await (const data of sseData(response, controller.signal)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) {
          answer.textContent += choice.delta.content;
          answer.dataset.updates = String(Number(answer.dataset.updates) + 1);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      $("status").textContent = finish === "length" ? "Stopped at the token limit." : "Done.";
      answer.parentElement.dataset.state = "done";
    } catch (error) {
      if (error.name === "AbortError") {
        $("status").textContent = "Stopped.";
        answer.parentElement.dataset.state = "stopped";
      } else {
        addTurn("error", String(error.message || error));
        $("status").textContent = "Failed.";
        answer.parentElement.dataset.state = "failed";
      }
    } finally {
      if (answer.textContent) conversation.push({ role: "assistant", content: answer.textContent });
      controller = null;
      setBusy(false);
    }
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  // Aborting the fetch closes the connection; the server notices and cancels the generation.
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    conversation.length = 0;
    $("transcript").replaceChildren();
    $("status").textContent = "";
  });
  loadModels();
})();
