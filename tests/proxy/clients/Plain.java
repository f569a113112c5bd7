// An app that knows nothing about proxies: HttpURLConnection, no proxy properties.
// Usage: java Plain GET|POST <url> [body]; prints "<status> <body>".
import java.io.InputStream;
import java.io.OutputStream;
import java.net.HttpURLConnection;
import java.net.Proxy;
import java.net.URL;
import java.nio.charset.StandardCharsets;

public class Plain {
    public static void main(String[] args) throws Exception {
        HttpURLConnection conn = (HttpURLConnection) new URL(args[1]).openConnection(Proxy.NO_PROXY);
        conn.setRequestMethod(args[0]);
        conn.setConnectTimeout(10000);
        conn.setReadTimeout(10000);
        if (args.length > 2) {
            conn.setDoOutput(true);
            conn.setRequestProperty("Content-Type", "application/json");
            try (OutputStream out = conn.getOutputStream()) {
                out.write(args[2].getBytes(StandardCharsets.UTF_8));
            }
        }
        int status = conn.getResponseCode();
        InputStream in = status >= 400 ? conn.getErrorStream() : conn.getInputStream();
        String body = in == null ? "" : new String(in.readAllBytes(), StandardCharsets.UTF_8);
        System.out.println(status + " " + body);
    }
}
