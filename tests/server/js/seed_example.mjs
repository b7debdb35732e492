// The JavaScript example of the seed provider pages (../shared/seeds/), unchanged except:
// baseURL and apiKey (as the pages allow), the model id (tokenmill serves its own models) and
// `stream`, which the page edits by hand ("// or false"), all read from the environment.
import OpenAI from "openai";

const openai = new OpenAI({
  baseURL: process.env.TOKENMILL_BASE_URL,
  apiKey: process.env.TOKENMILL_API_KEY,
});
const stream = process.env.STREAM !== "false"; // or false

async function run() {
  const completion = await openai.chat.completions.create({
    messages: [
      {
        role: "system",
        content: "Act like you are a helpful assistant.",
      },
      {
        role: "user",
        content: "Hi there!"
      }
    ],
    model: process.env.TOKENMILL_MODEL,
    stream
  });

  if (stream) {
    for await (const chunk of completion) {
      if (chunk.choices[0].finish_reason) {
        console.log(chunk.choices[0].finish_reason);
      } else {
        console.log(chunk.choices[0].delta.content);
      }
    }
  } else {
    console.log(JSON.stringify(completion));
  }
}

run();
